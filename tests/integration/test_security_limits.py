"""Limits a client runs into, on two real replicas sharing PostgreSQL and Redis: per-key requests and tokens per
minute enforced once across both replicas (429 in OpenAI's shape, with Retry-After and x-ratelimit-* headers),
the request body size limit (413, also for chunked uploads), the request bounds (400 naming the parameter), and a
key revoked on one replica refused at once by the other."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import mock_model
from tests.support.databases import fresh_postgres
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess

REDIS_URL = "redis://127.0.0.1:6379/0"
MAX_BODY = 4096
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
# Room needed before the key's one-minute window ends, so that no window boundary falls inside a test.
WINDOW_ROOM_S = 20.0


@pytest.fixture(scope="module")
def replicas(
    mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[StrataProcess, StrataProcess]]:
    """Replicas A and B: one PostgreSQL database, one encryption key, one Redis."""
    loop = asyncio.new_event_loop()  # one loop for the database's whole life: asyncio.run would drop it at once
    database = fresh_postgres()
    database_url = loop.run_until_complete(database.__aenter__())
    config = {
        "models": [mock_model(mock_backend)],
        "database_url": database_url,
        "redis_url": REDIS_URL,
        # Long enough that only the revocation broadcast can explain a replica dropping a cached key.
        "security": {"key_cache_ttl_s": 600},
        "limits": {"max_body_bytes": MAX_BODY, "max_messages": 3, "max_tokens": 100, "max_tools": 2},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    env = {
        "MOCK_API_KEY": "mock-secret",
        "STRATA_ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    servers: list[StrataProcess] = []
    try:
        for name in ("a", "b"):  # one after the other: the first one migrates the fresh database
            servers.append(StrataProcess(tmp_path_factory.mktemp(f"replica-{name}"), config, env).start())
        yield servers[0], servers[1]
        for server in servers:
            assert server.stop() == 0
            assert '"unhandled error"' not in server.logs(), server.logs()
    finally:
        for server in servers:
            server.stop()
        loop.run_until_complete(database.__aexit__(None, None, None))
        loop.close()


def new_key(server: StrataProcess, **fields: Any) -> tuple[str, str]:
    """(id, secret) of a fresh user key with a name of its own."""
    body = {"name": f"limits-{uuid.uuid4().hex[:12]}", "role": "user", **fields}
    response = httpx.post(server.url + "/admin/keys", json=body, headers=server.headers, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["key"]


def reset_s(value: str) -> float:
    """An x-ratelimit-reset-* value ("250ms", "12s", "1m0s") in seconds."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?", value)
    assert match and value, f"not a reset duration: {value!r}"
    minutes, seconds, millis = (int(part or 0) for part in match.groups())
    return minutes * 60 + seconds + millis / 1000


def wait_for_fresh_window(reset_after_s: float) -> bool:
    """Sleep into the key's next window when the current one ends too soon; True if it slept."""
    if reset_after_s >= WINDOW_ROOM_S:
        return False
    time.sleep(reset_after_s + 0.5)
    return True


def assert_rate_limit_error(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", code)
    assert error["request_id"] == response.headers["x-request-id"]
    assert 1 <= int(response.headers["retry-after"]) <= 60
    return error


def test_requests_per_minute_hold_across_two_replicas(
    replicas: tuple[StrataProcess, StrataProcess], mock_backend: MockBackend
) -> None:
    a, b = replicas
    _, key = new_key(a, rpm=6)
    with a.client(key, timeout=10) as on_a, b.client(key, timeout=10) as on_b:
        first = on_a.post("/v1/chat/completions", json=CHAT)
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-limit-requests"] == "6"
        assert first.headers["x-ratelimit-remaining-requests"] == "5"
        spent = 0 if wait_for_fresh_window(reset_s(first.headers["x-ratelimit-reset-requests"])) else 1
        backend_calls = len(mock_backend.chat_requests())
        responses = [(on_b if i % 2 == 0 else on_a).post("/v1/chat/completions", json=CHAT) for i in range(12)]

    statuses = [r.status_code for r in responses]
    allowed = 6 - spent
    assert statuses == [200] * allowed + [429] * (12 - allowed), statuses
    # One counter for both replicas: each answer counts down what is left, whichever replica served it.
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in responses[:allowed]]
    assert remaining == list(range(allowed - 1, -1, -1))
    assert len(mock_backend.chat_requests()) == backend_calls + allowed, "refused requests never reach the model"

    refused = responses[allowed:]
    assert {r.url.port for r in refused} == {a.port, b.port}, "both replicas refuse"
    for response in refused:
        error = assert_rate_limit_error(response, "rate_limit_requests")
        assert "6 requests per minute" in error["message"]
        assert response.headers["x-ratelimit-limit-requests"] == "6"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert int(response.headers["retry-after"]) >= reset_s(response.headers["x-ratelimit-reset-requests"]) - 1

    # The limit is the key's own: another key (the admin's) is not held back.
    assert httpx.get(b.url + "/v1/me", headers=b.headers, timeout=10).status_code == 200


def test_the_openai_client_sees_a_rate_limit_error(replicas: tuple[StrataProcess, StrataProcess]) -> None:
    a, b = replicas
    _, key = new_key(a, rpm=1)
    clients = [openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0) for server in (a, b)]
    clients[0].models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        clients[1].models.list()
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_requests"
    assert caught.value.response.headers["retry-after"]


def test_tokens_per_minute_hold_across_two_replicas(
    replicas: tuple[StrataProcess, StrataProcess], mock_backend: MockBackend
) -> None:
    a, b = replicas
    tpm, per_request = 40, 15
    mock_backend.default = Reply(content="ok", prompt_tokens=10, completion_tokens=5)
    _, key = new_key(a, tpm=tpm)
    with a.client(key, timeout=10) as on_a, b.client(key, timeout=10) as on_b:
        first = on_a.post("/v1/chat/completions", json=CHAT)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["total_tokens"] == per_request
        assert first.headers["x-ratelimit-limit-tokens"] == str(tpm)
        assert first.headers["x-ratelimit-remaining-tokens"] == str(tpm)  # checked before this request
        used = 0 if wait_for_fresh_window(reset_s(first.headers["x-ratelimit-reset-tokens"])) else per_request
        responses = []
        for i in range(6):
            time.sleep(0.3)  # a response's tokens are counted just after it is sent
            response = (on_b if i % 2 == 0 else on_a).post("/v1/chat/completions", json=CHAT)
            responses.append(response)
            if response.status_code != 200:
                break

    allowed = -(-(tpm - used) // per_request)  # requests start while this minute's tokens are under tpm
    assert [r.status_code for r in responses] == [200] * allowed + [429], [r.text for r in responses]
    assert [int(r.headers["x-ratelimit-remaining-tokens"]) for r in responses[:allowed]] == [
        tpm - used - per_request * i for i in range(allowed)
    ]
    error = assert_rate_limit_error(responses[-1], "rate_limit_tokens")
    assert f"{tpm} tokens per minute" in error["message"]
    assert responses[-1].headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert responses[-1].headers["x-ratelimit-remaining-tokens"] == "0"


def big_chat(size: int = 10_000) -> bytes:
    body = httpx.Request("POST", "http://x", json={**CHAT, "messages": [{"role": "user", "content": "x" * size}]})
    assert len(body.content) > size
    return body.content


def chunks(data: bytes, size: int = 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def assert_body_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "body_too_large"
    assert str(MAX_BODY) in error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/agents/demo/runs", "/admin/keys"])
def test_a_body_over_the_limit_gets_413(
    replicas: tuple[StrataProcess, StrataProcess], mock_backend: MockBackend, path: str
) -> None:
    a, _ = replicas
    body = big_chat()
    before = len(mock_backend.chat_requests())
    with a.client(timeout=10) as client:
        declared = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert_body_too_large(declared)
        chunked = client.build_request("POST", path, content=chunks(body), headers={"Content-Type": "application/json"})
        assert "content-length" not in chunked.headers and chunked.headers["transfer-encoding"] == "chunked"
        assert_body_too_large(client.send(chunked))
    assert len(mock_backend.chat_requests()) == before, "nothing of a refused body reaches the model"

    # The server keeps serving, chunked bodies under the limit included.
    with a.client(timeout=10) as client:
        small = httpx.Request("POST", "http://x", json=CHAT).content
        ok = client.post("/v1/chat/completions", content=chunks(small, 8), headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] == Reply().content


def test_bounds_name_the_parameter_and_the_limit(
    replicas: tuple[StrataProcess, StrataProcess], mock_backend: MockBackend
) -> None:
    _, b = replicas
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    user = {"role": "user", "content": "hi"}
    cases = [
        ({"messages": [user] * 4}, "messages", "limit of 3"),
        ({"messages": [user], "max_tokens": 101}, "max_tokens", "limit of 100"),
        ({"messages": [user], "max_completion_tokens": 500}, "max_completion_tokens", "limit of 100"),
        ({"messages": [user], "tools": [tool] * 3}, "tools", "limit of 2"),
    ]
    before = len(mock_backend.chat_requests())
    with b.client(timeout=10) as client:
        for body, param, limit in cases:
            response = client.post("/v1/chat/completions", json={"model": "mock-model", **body})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", param), error
            assert limit in error["message"], error
        assert len(mock_backend.chat_requests()) == before, "a refused request never reaches the model"

        at_the_limit = {"messages": [user] * 3, "max_tokens": 100, "tools": [tool] * 2}
        response = client.post("/v1/chat/completions", json={"model": "mock-model", **at_the_limit})
        assert response.status_code == 200, response.text
        assert len(mock_backend.chat_requests()[-1].body["messages"]) == 3

    client = openai.OpenAI(base_url=b.base_url, api_key=b.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="mock-model", messages=[user] * 4)  # type: ignore[list-item]
    assert caught.value.param == "messages" and "limit of 3" in caught.value.message


def test_a_key_revoked_on_one_replica_is_refused_by_the_other_at_once(
    replicas: tuple[StrataProcess, StrataProcess],
) -> None:
    a, b = replicas
    key_id, key = new_key(a)
    with a.client(key, timeout=10) as on_a, b.client(key, timeout=10) as on_b:
        assert on_b.get("/v1/me").json()["key_id"] == key_id  # B has it cached now (for up to 600 s)
        assert on_a.get("/v1/me").status_code == 200
        revoked = httpx.post(f"{a.url}/admin/keys/{key_id}/revoke", headers=a.headers, timeout=10)
        assert revoked.status_code == 200 and revoked.json()["active"] is False
        refused = on_b.get("/v1/me")  # the very next request, on the replica that did not revoke it
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "revoked_api_key"
        assert on_a.get("/v1/me").status_code == 401
        assert on_b.post("/v1/chat/completions", json=CHAT).status_code == 401
    # Other keys are unaffected.
    assert httpx.get(b.url + "/v1/me", headers=b.headers, timeout=10).status_code == 200


def test_many_revocations_in_a_row_each_take_effect_at_once(replicas: tuple[StrataProcess, StrataProcess]) -> None:
    """The broadcast is not a lucky race: every key, revoked on either replica, is refused at once on the other."""
    a, b = replicas
    for i in range(10):
        here, there = (a, b) if i % 2 == 0 else (b, a)
        key_id, key = new_key(here)
        with there.client(key, timeout=10) as remote:
            assert remote.get("/v1/me").status_code == 200
            assert httpx.post(f"{here.url}/admin/keys/{key_id}/revoke", headers=here.headers, timeout=10).is_success
            assert remote.get("/v1/me").status_code == 401, f"revocation {i} was not seen at once"


def test_the_replicas_share_keys(replicas: tuple[StrataProcess, StrataProcess]) -> None:
    """Sanity for the tests above: a key made on A works on B, so both really use one database."""
    a, b = replicas
    key_id, key = new_key(a, rpm=1000)
    me = httpx.get(b.url + "/v1/me", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert me.status_code == 200 and me.json()["key_id"] == key_id
