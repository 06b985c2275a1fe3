"""JwtVerifier against real RSA keys: a JWKS file, and a JWKS URL served by a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from strata.config import JwtConfig
from strata.security.jwt_auth import JwksUnavailableError, JwtError, JwtVerifier, looks_like_jwt

ISSUER = "https://idp.example.com/"
AUDIENCE = "strata"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEY_A, KEY_B, STRANGER = rsa_key(), rsa_key(), rsa_key()


def jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    return {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", **extra}


def token(key: rsa.RSAPrivateKey = KEY_A, kid: str | None = "a", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, **claims}
    payload = {name: value for name, value in payload.items() if value is not None}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid} if kid else None)


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(KEY_A, "a", alg="RS256")]}))
    return path


@pytest.fixture
async def verifier(jwks_file: Path) -> AsyncIterator[JwtVerifier]:
    v = JwtVerifier(
        JwtConfig(
            issuer=ISSUER,
            audience=AUDIENCE,
            jwks_file=jwks_file,
            role_map={"strata-admins": "admin", "ml-team": "developer", "ops": "operator"},
        )
    )
    yield v
    await v.aclose()


async def refused(v: JwtVerifier, value: str) -> str:
    with pytest.raises(JwtError) as info:
        await v.verify(value)
    return str(info.value)


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(token())
    assert not looks_like_jwt("sk-strata-abc123")
    assert not looks_like_jwt("eyJhbGciOi.eyJzdWIi")  # two segments
    assert not looks_like_jwt("my.admin.key")  # not a JSON header
    assert not looks_like_jwt("eyJ.a b.c")


async def test_maps_roles_and_user(verifier: JwtVerifier) -> None:
    who = await verifier.verify(token(roles="strata-admins"))
    assert (who.user, who.role, who.via, who.key_id, who.name) == ("alice", "admin", "jwt", None, "alice")
    assert (await verifier.verify(token(roles="auditor"))).role == "auditor"  # a role name counts as itself


async def test_list_claim_takes_most_privileged(verifier: JwtVerifier) -> None:
    assert (await verifier.verify(token(roles=["user", "ml-team", "unknown"]))).role == "developer"
    assert (await verifier.verify(token(roles=["user", "auditor"]))).role == "auditor"
    assert (await verifier.verify(token(roles=["ml-team", "ops"]))).role == "operator"


async def test_no_role_without_default_is_refused(verifier: JwtVerifier) -> None:
    assert "maps to no Strata role" in await refused(verifier, token(roles=["nobody"]))
    assert "maps to no Strata role" in await refused(verifier, token())


async def test_default_role_and_custom_claims(jwks_file: Path) -> None:
    config = JwtConfig(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_file=jwks_file,
        user_claim="email",
        role_claim="realm_access.roles",
        default_role="user",
    )
    v = JwtVerifier(config)
    who = await v.verify(token(email="alice@example.com"))
    assert (who.user, who.role, who.name) == ("alice@example.com", "user", "alice")
    nested = await v.verify(token(email="bob@example.com", realm_access={"roles": ["operator"]}))
    assert nested.role == "operator"
    assert "'email'" in await refused(v, token())  # no user claim


async def test_refusals_say_why(verifier: JwtVerifier) -> None:
    now = int(time.time())
    assert "expired" in await refused(verifier, token(roles="user", exp=now - 120, iat=now - 600))
    assert "audience" in await refused(verifier, token(roles="user", aud="someone-else"))
    assert "issuer" in await refused(verifier, token(roles="user", iss="https://evil.example.com/"))
    assert "signature" in await refused(verifier, token(STRANGER, roles="user"))
    assert "key id 'zz'" in await refused(verifier, token(roles="user", kid="zz"))
    assert "'exp'" in await refused(verifier, token(roles="user", exp=None))
    assert "malformed" in await refused(verifier, "eyJhbGciOi.eyJzdWIi.c2ln")
    hs = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 60}, "s" * 32, algorithm="HS256")
    assert "algorithm 'HS256'" in await refused(verifier, hs)


async def test_leeway_accepts_slightly_expired(verifier: JwtVerifier) -> None:
    now = int(time.time())
    assert (await verifier.verify(token(roles="user", exp=now - 5, iat=now - 300))).user == "alice"


async def test_token_without_kid_uses_the_only_key(verifier: JwtVerifier) -> None:
    assert (await verifier.verify(token(kid=None, roles="user"))).role == "user"


def test_bad_jwks_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        JwtVerifier(JwtConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=missing))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        JwtVerifier(JwtConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=garbage))
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": []}')
    with pytest.raises(ValueError, match="no usable signing key"):
        JwtVerifier(JwtConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=empty))


class JwksServer:
    """A provider's JWKS endpoint on loopback, whose keys the test changes, counting the fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = [jwk(KEY_A, "a")]
        self.fetches = 0
        self.fail = False
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.fail:
            return web.Response(status=503)
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def provider() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    yield server
    await runner.cleanup()


@pytest.fixture
def clock() -> list[float]:
    """The verifier's monotonic clock, moved by the test (jwt's own exp checks keep real time)."""
    return [1000.0]


async def url_verifier(provider: JwksServer, clock: list[float], **extra: Any) -> JwtVerifier:
    config = JwtConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=provider.url, default_role="user", **extra)
    return JwtVerifier(config, clock=lambda: clock[0])


async def test_url_jwks_is_cached(provider: JwksServer, clock: list[float]) -> None:
    v = await url_verifier(provider, clock, jwks_cache_s=60)
    try:
        for _ in range(5):
            assert (await v.verify(token())).user == "alice"
        assert provider.fetches == 1
        clock[0] += 61  # the cache has gone stale: one fetch more
        await v.verify(token())
        assert provider.fetches == 2
    finally:
        await v.aclose()


async def test_url_key_rotation_and_refetch_limit(provider: JwksServer, clock: list[float]) -> None:
    v = await url_verifier(provider, clock)
    try:
        await v.verify(token())
        assert provider.fetches == 1
        clock[0] += 11
        provider.keys = [jwk(KEY_A, "a"), jwk(KEY_B, "b")]  # the provider publishes a new key
        assert (await v.verify(token(KEY_B, kid="b"))).user == "alice"
        assert provider.fetches == 2
        # Unknown kids fetch again at most once per 10 s.
        assert "key id 'c'" in await refused(v, token(KEY_B, kid="c"))
        assert "key id 'd'" in await refused(v, token(KEY_B, kid="d"))
        assert provider.fetches == 2
        clock[0] += 10
        assert "key id 'e'" in await refused(v, token(KEY_B, kid="e"))
        assert provider.fetches == 3
        # A key the provider withdrew stops working once the JWKS is fetched again.
        provider.keys = [jwk(KEY_B, "b")]
        clock[0] += 301
        assert "key id 'a'" in await refused(v, token())
    finally:
        await v.aclose()


async def test_url_outage_keeps_cached_keys(provider: JwksServer, clock: list[float]) -> None:
    v = await url_verifier(provider, clock, jwks_cache_s=60)
    try:
        await v.verify(token())
        provider.fail = True
        clock[0] += 61
        assert (await v.verify(token())).user == "alice"  # stale keys beat no keys
        assert provider.fetches == 2
        await v.verify(token())
        assert provider.fetches == 2  # and the failed fetch is not retried on every request
    finally:
        await v.aclose()


async def test_url_unreachable_at_first(provider: JwksServer, clock: list[float]) -> None:
    provider.fail = True
    v = await url_verifier(provider, clock)
    try:
        with pytest.raises(JwksUnavailableError, match="could not be fetched"):
            await v.verify(token())
        provider.fail = False
        with pytest.raises(JwksUnavailableError):
            await v.verify(token())  # within the back-off: no new fetch
        assert provider.fetches == 1
        clock[0] += 10
        assert (await v.verify(token())).user == "alice"
    finally:
        await v.aclose()


async def test_concurrent_first_requests_fetch_once(provider: JwksServer, clock: list[float]) -> None:
    v = await url_verifier(provider, clock)
    try:
        who = await asyncio.gather(*(v.verify(token()) for _ in range(20)))
        assert {p.user for p in who} == {"alice"}
        assert provider.fetches == 1
    finally:
        await v.aclose()
