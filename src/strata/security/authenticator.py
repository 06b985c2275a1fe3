"""Turns a request's credentials into a Principal.

API keys are looked up by their SHA-256 in an in-memory cache, so an authenticated request costs a
hash and a dict lookup; the database is read on a miss. A cached key is trusted for at most
`key_cache_ttl_s`. Revocation drops it at once: locally, and on every replica through Redis pub/sub
when Redis is configured.

Under load many requests arrive with the same key at once. One database read per key is in flight at a
time (single-flight: the others await it), and a key in use is re-read in the background during the last
fifth of its TTL, so its entry never lapses under traffic and no wave of requests waits on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from strata.config import RoleName
from strata.coordination import follow
from strata.resilience.single_flight import SingleFlight
from strata.security.api_keys import KEY_PREFIX, hash_key, is_strata_key
from strata.security.jwt_auth import JwksUnavailableError, JwtError, JwtVerifier, looks_like_jwt
from strata.security.principal import Principal
from strata.store.keys import KeyRecord, KeyStore

log = structlog.get_logger("strata.auth")
REVOKED_CHANNEL = "strata:keys:revoked"
_NEGATIVE_TTL_S = 5.0
_NEGATIVE_MAX = 10_000
_REFRESH_AHEAD = 0.2  # the last fifth of a cached key's TTL: re-read it in the background while it serves


class AuthUnavailable(Exception):
    """503: credentials cannot be checked right now (the identity provider's keys are unreachable)."""


class AuthError(Exception):
    """401: no credentials, or credentials that are not (or no longer) valid."""

    def __init__(self, message: str, code: str = "invalid_api_key") -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Cached:
    principal: Principal
    key_id: str
    valid_until: float  # monotonic: when the cache must re-read the key
    expires_at: float | None  # wall clock: the key's own expiry


def principal_of(key: KeyRecord) -> Principal:
    return Principal(
        user=key.user,
        role=cast(RoleName, key.role),
        via="key",
        key_id=key.id,
        name=key.name,
        models=frozenset(key.models) if key.models is not None else None,
        agents=frozenset(key.agents) if key.agents is not None else None,
        rpm=key.rpm,
        tpm=key.tpm,
        budget_usd=key.budget_usd,
    )


class Authenticator:
    def __init__(
        self,
        keys: KeyStore,
        *,
        ttl_s: float,
        jwt: JwtVerifier | None = None,
        redis: Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys
        self._ttl_s = ttl_s
        self._jwt = jwt
        self._redis = redis
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()  # hash -> until (monotonic)
        self._listener: asyncio.Task[None] | None = None
        self._reads: SingleFlight[str, KeyRecord | None] = SingleFlight()  # one database read per key at a time
        self._refreshing: set[asyncio.Task[None]] = set()
        self._forgotten = 0  # bumped by every forget: a read that began before one is not cached

    async def start(self) -> None:
        if self._redis is not None:
            pubsub = self._redis.pubsub()
            await pubsub.subscribe(REVOKED_CHANNEL)
            self._listener = asyncio.create_task(self._listen(pubsub))

    async def stop(self) -> None:
        for task in list(self._refreshing):
            task.cancel()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._jwt is not None:
            await self._jwt.aclose()

    async def authenticate(self, credential: str | None) -> Principal:
        if not credential:
            raise AuthError(
                "no credentials: send 'Authorization: Bearer <key>' (an sk-strata- API key or a JWT)",
                code="missing_credentials",
            )
        if credential.startswith(KEY_PREFIX):
            return await self._by_key(credential)
        if self._jwt is not None and looks_like_jwt(credential):
            try:
                return await self._jwt.verify(credential)
            except JwksUnavailableError as exc:
                raise AuthUnavailable(str(exc)) from None
            except JwtError as exc:
                raise AuthError(f"the bearer token was refused: {exc}", code="invalid_token") from None
        return await self._by_key(credential)  # STRATA_ADMIN_KEY may be any string the operator chose

    async def _by_key(self, secret: str) -> Principal:
        if secret.startswith(KEY_PREFIX) and not is_strata_key(secret):
            raise AuthError("the API key is malformed (its checksum does not match): check for a copy error")
        digest = hash_key(secret)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached.valid_until > now:
            if cached.expires_at is not None and cached.expires_at <= time.time():
                raise AuthError(f"the API key {cached.principal.name!r} has expired", code="expired_api_key")
            if now >= cached.valid_until - self._ttl_s * _REFRESH_AHEAD and not self._reads.running(digest):
                task = asyncio.create_task(self._refresh(digest))
                self._refreshing.add(task)
                task.add_done_callback(self._refreshing.discard)
            return cached.principal
        until = self._unknown.get(digest)
        if until is not None and until > now:
            raise AuthError("the API key is not valid")
        key = await self._read(digest)
        if key is None:
            raise AuthError("the API key is not valid")
        if key.revoked_at is not None:
            raise AuthError(f"the API key {key.name!r} has been revoked", code="revoked_api_key")
        if key.expires_at is not None and key.expires_at <= datetime.now(UTC):
            raise AuthError(f"the API key {key.name!r} has expired", code="expired_api_key")
        return principal_of(key)

    async def _read(self, digest: str) -> KeyRecord | None:
        """The key behind `digest` from the database, one read per digest at a time; the result is cached."""
        return await self._reads.do(digest, lambda: self._load(digest))

    async def _load(self, digest: str) -> KeyRecord | None:
        while True:
            forgotten = self._forgotten
            key = await self.keys.by_hash(digest)
            if forgotten == self._forgotten:
                break  # otherwise a revoke landed while reading: read again rather than cache what it dropped
        self._remember(digest, key)
        return key

    def _remember(self, digest: str, key: KeyRecord | None) -> None:
        now = self._clock()
        if key is None or key.revoked_at is not None:
            self._cache.pop(digest, None)
            self._remember_unknown(digest, now)
            return
        if key.expires_at is not None and key.expires_at <= datetime.now(UTC):
            self._cache.pop(digest, None)
            return
        expires_at = key.expires_at.timestamp() if key.expires_at else None
        self._cache[digest] = _Cached(principal_of(key), key.id, now + self._ttl_s, expires_at)

    async def _refresh(self, digest: str) -> None:
        try:
            await self._read(digest)
        except Exception as exc:  # the entry still serves until its TTL; the next request tries again
            log.warning("refreshing a cached API key failed", error=str(exc))

    def _remember_unknown(self, digest: str, now: float) -> None:
        self._unknown[digest] = now + _NEGATIVE_TTL_S
        self._unknown.move_to_end(digest)
        while len(self._unknown) > _NEGATIVE_MAX:
            self._unknown.popitem(last=False)

    async def forget(self, key_id: str) -> None:
        """After a revoke or an update: this replica at once, the others through Redis."""
        self.forget_locally(key_id)
        if self._redis is not None:
            await self._redis.publish(REVOKED_CHANNEL, key_id)

    def forget_locally(self, key_id: str) -> None:
        self._forgotten += 1
        for digest in [d for d, c in self._cache.items() if c.key_id == key_id]:
            del self._cache[digest]

    async def _listen(self, pubsub: PubSub) -> None:
        def revoked(data: bytes | str) -> None:
            self.forget_locally(data.decode() if isinstance(data, bytes) else str(data))

        def lost(exc: Exception) -> None:
            # Redis went away: no broadcast can arrive, so trust nothing cached meanwhile.
            log.warning("key revocation channel lost; retrying", error=str(exc))
            self._cache.clear()

        await follow(pubsub, REVOKED_CHANNEL, revoked, lost)
