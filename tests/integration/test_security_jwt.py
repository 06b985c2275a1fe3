"""JWT bearer tokens through a real server: an identity provider's token maps to a role and a user."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend
from tests.support.strata_process import StrataProcess

ISSUER = "https://sso.example.com/realms/acme"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: rsa.RSAPrivateKey = KEY, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "strata", "sub": "alice", "iat": now, "exp": now + 300, **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture(scope="module")
def server(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    workdir = tmp_path_factory.mktemp("jwt")
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**json.loads(RSAAlgorithm.to_jwk(KEY.public_key())), "kid": "k1"}]}))
    config = {
        "models": [mock_model(mock_backend)],
        "agents": [{"name": "helper", "model": "mock-model"}],
        "security": {
            "jwt": {
                "issuer": ISSUER,
                "audience": "strata",
                "jwks_file": str(jwks),
                "role_claim": "groups",
                "role_map": {"ml-engineers": "developer", "sre": "operator"},
            }
        },
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 2},
    }
    process = StrataProcess(workdir, config, {"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0


def test_a_token_maps_its_claims_to_a_role_and_a_user(server: StrataProcess) -> None:
    client = server.client(token(groups=["ml-engineers"]))
    me = client.get("/v1/me").json()
    assert (me["user"], me["role"], me["via"], me["key_id"]) == ("alice", "developer", "jwt", None)
    chat = client.post(
        "/v1/chat/completions", json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 200
    assert client.get("/admin/deployments").status_code == 403  # developer, not operator
    assert server.client(token(groups=["sre"])).get("/admin/deployments").status_code == 200


def test_runs_of_a_token_user_are_theirs_alone(server: StrataProcess) -> None:
    alice = server.client(token(groups=["ml-engineers"]))
    bob = server.client(token(sub="bob", groups=["ml-engineers"]))
    run = alice.post("/v1/agents/helper/runs", json={"input": "hello"}, timeout=30).json()
    assert alice.get(f"/v1/runs/{run['id']}").status_code == 200
    assert bob.get(f"/v1/runs/{run['id']}").status_code == 404


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: token(groups=["ml-engineers"], exp=int(time.time()) - 120), "expired"),
        (lambda: token(groups=["ml-engineers"], aud="someone-else"), "audience"),
        (lambda: token(rsa.generate_private_key(public_exponent=65537, key_size=2048), groups=["sre"]), "signature"),
        (lambda: token(groups=["marketing"]), "role"),
    ],
)
def test_bad_tokens_get_401_with_the_reason(server: StrataProcess, bad: Any, reason: str) -> None:
    response = server.client(bad()).get("/v1/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_token"
    assert reason in response.json()["error"]["message"].lower()


def test_tokens_never_reach_the_logs(server: StrataProcess, tmp_path: Path) -> None:
    secret = token(groups=["sre"])
    server.client(secret + "x").get("/v1/me")  # a refused token is the likeliest to be logged
    assert secret not in server.logs()
