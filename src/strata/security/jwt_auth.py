"""Bearer JWTs from an identity provider, verified against its JWKS and mapped to a Strata role.

Keys come from a JWKS file (read once, at construction) or a JWKS URL. The URL is fetched with
httpx's async client, never urllib (PyJWT's `PyJWKClient` blocks the event loop), cached for
`jwks_cache_s`, and fetched again early when a token names an unknown `kid` — providers rotate keys
by publishing the new one before signing with it — but at most once per `_REFETCH_MIN_S`, so a flood
of tokens with made-up `kid`s cannot turn Strata into a load generator against the provider.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import jwt
import structlog

from strata.config import JwtConfig, RoleName
from strata.security.principal import Principal
from strata.security.rbac import ROLES

log = structlog.get_logger("strata.auth.jwt")

_REFETCH_MIN_S = 10.0  # the fewest seconds between two fetches of the JWKS URL
_FETCH_TIMEOUT_S = 5.0
_MAX_JWKS_BYTES = 1 << 20
# A JWT header is a base64url JSON object, so its encoding starts with "ey" ('{' then '"' or a space).
_JWT_SHAPE = re.compile(r"ey[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# Several roles in one token: the principal carries one, so take the one that grants the most.
# auditor ranks above user because it sees every user's runs and usage; note that it cannot invoke
# models, so a token holding both gets auditor's read-only view — give such users a mapped role instead.
_PRECEDENCE: dict[str, int] = {"admin": 0, "operator": 1, "developer": 2, "auditor": 3, "user": 4, "metrics": 5}
assert set(_PRECEDENCE) == set(ROLES), "rank every role"


class JwtError(ValueError):
    """A bearer JWT that Strata refuses; the message says why and is safe to show the caller."""


class JwksUnavailableError(JwtError):
    """The provider's keys could not be fetched (and none are cached): the token cannot be judged."""


def looks_like_jwt(token: str) -> bool:
    """True when the bearer value has a JWT's shape, so the caller can skip the API-key lookup."""
    return _JWT_SHAPE.fullmatch(token) is not None


class _KeyRing:
    """Verification keys by (kid, algorithm): a JWK without "alg" may serve several algorithms."""

    def __init__(self, jwks: Any, algorithms: Iterable[str], source: str) -> None:
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise ValueError(f"{source}: not a JWKS (a JSON object with a 'keys' list)")
        self.keys: dict[tuple[str | None, str], jwt.PyJWK] = {}
        self.kids: set[str | None] = set()
        for entry in jwks["keys"]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue  # encryption keys never verify a signature
            kid = entry.get("kid")
            kid = kid if isinstance(kid, str) else None
            candidates = [entry["alg"]] if isinstance(entry.get("alg"), str) else list(algorithms)
            for alg in candidates:
                if alg not in algorithms:
                    continue
                try:
                    self.keys[(kid, alg)] = jwt.PyJWK(entry, algorithm=alg)
                except jwt.PyJWTError:  # a key of another type, or one this PyJWT cannot use
                    continue
                self.kids.add(kid)
        if not self.keys:
            raise ValueError(f"{source}: no usable signing key for the algorithms {sorted(algorithms)}")

    def find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        if kid is None and len(self.kids) == 1:  # a token without "kid" is fine when there is one key
            kid = next(iter(self.kids))
        return self.keys.get((kid, alg))


def _load_file(path: Path, algorithms: list[str]) -> _KeyRing:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read the JWKS file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ValueError(f"the JWKS file {path} is not valid JSON: {exc}") from exc
    return _KeyRing(data, algorithms, f"the JWKS file {path}")


def _claim(claims: dict[str, Any], name: str) -> Any:
    """A top-level claim, else a dotted path into nested objects (Keycloak's `realm_access.roles`)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class JwtVerifier:
    """Verifies bearer JWTs (signature, exp/nbf, issuer, audience) and maps their claims to a Principal."""

    def __init__(self, config: JwtConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._algorithms = list(config.algorithms)
        self._ring: _KeyRing | None = None
        self._fetched_at = -float("inf")  # monotonic time of the last successful fetch
        self._tried_at = -float("inf")  # monotonic time of the last attempt, successful or not
        self._lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None
        if config.jwks_file is not None:
            self._ring = _load_file(config.jwks_file, self._algorithms)
        else:
            assert config.jwks_url is not None
            parts = urlsplit(config.jwks_url)
            if parts.scheme not in ("http", "https"):
                raise ValueError(f"the JWKS URL must be http(s): {config.jwks_url!r}")
            if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
                log.warning("jwks url is not https: anyone on the path can forge tokens", url=config.jwks_url)
            self._client = httpx.AsyncClient(timeout=_FETCH_TIMEOUT_S, headers={"accept": "application/json"})

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def verify(self, token: str) -> Principal:
        """The principal a valid token names; JwtError, with the reason, for any other token."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise JwtError("the token is malformed (not a JWS compact serialization)") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise JwtError(f"the token's algorithm {str(alg)[:20]!r} is not one of {self._algorithms}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise JwtError("the token's 'kid' header is not a string")
        key = await self._key(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise JwtError("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise JwtError(f"the token's audience is not {self.config.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise JwtError(f"the token's issuer is not {self.config.issuer!r}") from None
        except jwt.InvalidSignatureError:
            raise JwtError("the token's signature does not verify") from None
        except jwt.ImmatureSignatureError:
            raise JwtError("the token is not valid yet (nbf or iat is in the future)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise JwtError(f"the token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise JwtError(f"the token is invalid: {exc}") from None
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        user = _claim(claims, self.config.user_claim)
        if not isinstance(user, str) or not user:
            raise JwtError(f"the token has no {self.config.user_claim!r} claim naming the user")
        role = self._role(_claim(claims, self.config.role_claim))
        subject = claims.get("sub")
        return Principal(user=user, role=role, via="jwt", name=subject if isinstance(subject, str) else user)

    def _role(self, value: Any) -> RoleName:
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        roles: list[str] = []
        for item in values:
            if not isinstance(item, str):
                continue
            mapped = self.config.role_map.get(item, item)
            if mapped in _PRECEDENCE:
                roles.append(mapped)
        if roles:
            return cast(RoleName, min(roles, key=_PRECEDENCE.__getitem__))
        if self.config.default_role is not None:
            return self.config.default_role
        raise JwtError(f"the token's {self.config.role_claim!r} claim maps to no Strata role, and none is the default")

    async def _key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key for (kid, alg), fetching the JWKS URL when its cache is stale or the kid is new."""
        label = "(none)" if kid is None else repr(kid[:64])
        if self._client is None:  # a JWKS file: what it holds is all there is
            assert self._ring is not None
            key = self._ring.find(kid, alg)
            if key is None:
                raise JwtError(f"the token's key id {label} is not in the JWKS for algorithm {alg}")
            return key
        if self._clock() - self._fetched_at >= self.config.jwks_cache_s:
            await self._refresh(stale=True)
        key = self._ring.find(kid, alg) if self._ring is not None else None
        if key is None and self._clock() - self._tried_at >= _REFETCH_MIN_S:
            await self._refresh(stale=False)  # a key rotation: the provider may have published it since
            key = self._ring.find(kid, alg) if self._ring is not None else None
        if key is None:
            if self._ring is None:
                raise JwksUnavailableError(f"the provider's keys could not be fetched from {self.config.jwks_url}")
            raise JwtError(f"the token's key id {label} is not in the provider's JWKS for algorithm {alg}")
        return key

    async def _refresh(self, *, stale: bool) -> None:
        """Fetch the JWKS once for all waiting requests; on failure keep the keys already held."""
        tried_before = self._tried_at
        async with self._lock:
            if self._tried_at != tried_before:  # another request fetched while this one waited
                return
            if stale and self._clock() - self._fetched_at < self.config.jwks_cache_s:
                return
            self._tried_at = self._clock()
            try:
                self._ring = await self._fetch()
                self._fetched_at = self._tried_at
            except (httpx.HTTPError, ValueError) as exc:
                # Keep serving the keys we have; try again in _REFETCH_MIN_S rather than on every request.
                self._fetched_at = max(self._fetched_at, self._tried_at - self.config.jwks_cache_s + _REFETCH_MIN_S)
                log.warning(
                    "jwks fetch failed", url=self.config.jwks_url, error=str(exc), keeping=self._ring is not None
                )

    async def _fetch(self) -> _KeyRing:
        assert self._client is not None and self.config.jwks_url is not None
        response = await self._client.get(self.config.jwks_url)
        response.raise_for_status()
        if len(response.content) > _MAX_JWKS_BYTES:
            raise ValueError(f"the JWKS is larger than {_MAX_JWKS_BYTES} bytes")
        return _KeyRing(response.json(), self._algorithms, f"the JWKS at {self.config.jwks_url}")
