"""Property-based API tests with schemathesis against a real, throwaway `strata serve` (mock model, admin key).

Every operation in `GET /openapi.json` (it needs credentials: the admin key goes in every request) is called with
generated valid and invalid inputs; each response must not be a server error (`not_a_server_error`: no 5xx), and
a response whose status the schema documents must match its documented schema (`response_schema_conformance`).
Operations that would reconfigure the server under the run (`POST /admin/reload`, `POST /admin/models/{name}/deploy`)
are left out; generated key ids never name the admin key, so rotating or revoking keys cannot lock the run out.

CI runs a few examples per operation (well under a minute). The full version, for a release or after changing
the API:

    STRATA_SCHEMATHESIS_EXAMPLES=200 .venv/bin/python -m pytest tests/integration/test_security_schemathesis.py

(about a minute at 100). Each operation is a subtest; a failure names it, the generated request (as curl) and the
server's log lines for its request id, with the traceback of a 5xx.

The end of the module replays, on SQLite and on PostgreSQL, inputs that longer runs found to crash the server
(5xx, or an event stream that hangs or is cut off), so they stay fixed once fixed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import mock_model
from tests.support.databases import postgres_database
from tests.support.mock_backend import MockBackend
from tests.support.strata_process import StrataProcess

EXAMPLES = int(os.environ.get("STRATA_SCHEMATHESIS_EXAMPLES", "5"))
CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture(scope="module")
def throwaway(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    """A server of this module's own: whatever the generated requests create or change dies with it."""
    config = {
        "models": [mock_model(mock_backend)],
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
        "runs": {"sync_wait_s": 5},  # a generated sync run never holds the test for long
    }
    process = StrataProcess(tmp_path_factory.mktemp("schemathesis"), config, {"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0
    assert not unhandled_errors(process.logs()), "\n".join(unhandled_errors(process.logs()))


def unhandled_errors(logs: str) -> list[str]:
    """One line per distinct unhandled error in the server log: the route, Strata's last frame, the exception."""
    found: dict[str, int] = {}
    for line in logs.splitlines():
        if '"unhandled error"' not in line:
            continue
        entry = json.loads(line)
        trace = entry.get("exception", "").strip().splitlines() or ["?"]
        frames = [frame.strip() for frame in trace if "/strata/" in frame and frame.strip().startswith("File")]
        key = f"{entry.get('path')}: {frames[-1] if frames else '?'}: {trace[-1]}"
        found[key] = found.get(key, 0) + 1
    return [f"{count}x {key}" for key, count in found.items()]


def server_log_for(server: StrataProcess, request_id: str | None) -> str:
    lines = [line for line in server.logs().splitlines() if request_id and request_id in line]
    return "\n".join(lines[-5:]) or "(nothing logged for it)"


def check_operation(operation: Any, mode: GenerationMode, server: StrataProcess) -> None:
    """Generated requests for one operation, each answered without a 5xx and as documented."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def examples(case: Any) -> None:
        response = case.call(headers=server.headers, timeout=15)
        try:
            case.validate_response(response, checks=CHECKS, headers=server.headers)
        except BaseException as exc:
            request_id = (response.headers.get("x-request-id") or [None])[0]  # schemathesis: header -> values
            exc.add_note(f"server log for request {request_id}:\n{server_log_for(server, request_id)}")
            raise

    examples()


def test_api_conforms_and_never_fails_on_the_server(throwaway: StrataProcess, subtests: Any) -> None:
    # schemathesis' own pytest integration (`schemathesis.pytest.from_fixture`) breaks on pytest 9 (it reads the
    # removed `Node._nodeid`), so the operations are driven here, one subtest each, with its Hypothesis strategies.
    schema = (
        schemathesis.openapi.from_url(throwaway.url + "/openapi.json", headers=throwaway.headers, timeout=10)
        .exclude(method="POST", path="/admin/reload")
        .exclude(method="POST", path="/admin/models/{name}/deploy")
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert "POST /v1/chat/completions" in labels and "POST /admin/reload" not in labels
    assert len(operations) >= 25, labels
    for operation in operations:
        inputs = (operation.path_parameters, operation.query, operation.headers, operation.cookies, operation.body)
        # Invalid requests exist only for operations that take some input.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if any(map(len, inputs)) else [])
        for mode in modes:
            with subtests.test(operation=operation.label, mode=mode.value):
                check_operation(operation, mode, throwaway)


def test_the_schema_needs_credentials(throwaway: StrataProcess) -> None:
    """The description of the API is not served to anyone who asks."""
    anonymous = httpx.get(throwaway.url + "/openapi.json", timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    with throwaway.client(timeout=10) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/agents/{agent}/runs", "/admin/keys"} <= set(paths)


# Inputs schemathesis found (with STRATA_SCHEMATHESIS_EXAMPLES=100) or that follow from what it found, replayed on
# both databases: each must be refused as a client error, never answered with a 500 or a cut-off stream.
BIG = 2**63  # past SQLite's and PostgreSQL's integers
BOTH = ("sqlite", "postgresql")
PG = ("postgresql",)  # SQLite stores these or finds nothing (201/200/404 are right there)
# A cursor in the shape the lists hand out, at a position no 64-bit column holds.
CURSOR_PAST_INT64 = base64.urlsafe_b64encode(b'["runs",' + str(2**64).encode() + b',"run_x"]').decode().rstrip("=")
FINDINGS: list[tuple[str, str, str, dict[str, Any], tuple[str, ...]]] = [
    ("key-expires-in-overflow", "POST", "/admin/keys", {"json": {"name": "a", "expires_in_s": 1e300}}, BOTH),
    ("key-expires-in-past-year-9999", "POST", "/admin/keys", {"json": {"name": "a", "expires_in_s": 1e12}}, BOTH),
    ("key-rpm-too-big", "POST", "/admin/keys", {"json": {"name": "a", "rpm": BIG}}, BOTH),
    ("key-tpm-too-big", "POST", "/admin/keys", {"json": {"name": "a", "tpm": BIG}}, BOTH),
    ("key-rpm-past-int32", "POST", "/admin/keys", {"json": {"name": "a", "rpm": 2**31}}, PG),
    ("key-update-rpm-too-big", "PATCH", "/admin/keys/{key}", {"json": {"rpm": BIG}}, BOTH),
    ("audit-after-id-too-big", "GET", "/admin/audit", {"params": {"after_id": BIG}}, BOTH),
    ("audit-since-year-1", "GET", "/admin/audit", {"params": {"since": "0001-01-01T00:00:00+14:00"}}, BOTH),
    ("audit-since-year-9999", "GET", "/admin/audit", {"params": {"since": "9999-12-31T23:59:59-14:00"}}, BOTH),
    ("runs-from-year-1", "GET", "/v1/runs", {"params": {"from": "0001-01-01T00:00:00+14:00"}}, BOTH),
    ("traces-to-year-9999", "GET", "/v1/traces", {"params": {"to": "9999-12-31T23:59:59-14:00"}}, BOTH),
    ("runs-cursor-past-int64", "GET", "/v1/runs", {"params": {"cursor": CURSOR_PAST_INT64}}, BOTH),
    ("session-metadata-huge-int", "POST", "/v1/sessions", {"json": {"agent": "demo", "metadata": {"n": 10**40}}}, BOTH),
    (
        "key-expires-at-year-1",
        "POST",
        "/admin/keys",
        {"json": {"name": "a", "expires_at": "0001-01-01T00:00+14:00"}},
        PG,
    ),
    (
        "key-expires-at-year-9999",
        "POST",
        "/admin/keys",
        {"json": {"name": "a", "expires_at": "9999-12-31T23:59-14:00"}},
        PG,
    ),
    ("nul-in-key-id", "GET", "/admin/keys/a%00b", {}, PG),
    ("nul-in-run-id", "GET", "/v1/runs/a%00b", {}, PG),
    ("nul-in-session-id", "GET", "/v1/sessions/a%00b", {}, PG),
    ("nul-in-audit-action", "GET", "/admin/audit", {"params": {"action": "a\0b"}}, PG),
    ("nul-in-runs-agent", "GET", "/v1/runs", {"params": {"agent": "a\0b"}}, PG),
    ("nul-in-run-session-id", "POST", "/v1/agents/demo/runs", {"json": {"input": "hi", "session_id": "a\0b"}}, PG),
]


@dataclass
class Target:
    server: StrataProcess
    backend: str
    run_id: str
    last_event_id: int
    key_id: str


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def target(
    request: pytest.FixtureRequest, mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    with contextlib.ExitStack() as stack:
        config: dict[str, Any] = {"models": [mock_model(mock_backend)], "server": {"drain_delay_s": 0}}
        env = {"MOCK_API_KEY": "mock-secret"}
        if request.param == "postgresql":
            config["database_url"] = stack.enter_context(postgres_database())
            env["STRATA_ENCRYPTION_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()
        server = StrataProcess(tmp_path_factory.mktemp(f"findings-{request.param}"), config, env).start()
        stack.callback(server.stop)
        with server.client(timeout=10) as client:
            run = client.post("/v1/agents/demo/runs", json={"input": "hi"}).json()
            assert run["status"] == "completed", run
            events = client.get(f"/v1/runs/{run['id']}/events").text
            last = max(int(line[4:]) for line in events.splitlines() if line.startswith("id: "))
            key = client.post("/admin/keys", json={"name": "findings"}).json()
        yield Target(server, request.param, run["id"], last, key["id"])


def cases(backends: tuple[str, ...]) -> list[Any]:
    return [pytest.param(*case[1:4], id=case[0]) for case in FINDINGS if case[4] == backends]


@pytest.mark.parametrize(("method", "path", "kwargs"), cases(BOTH))
def test_found_inputs_get_a_client_error(target: Target, method: str, path: str, kwargs: dict[str, Any]) -> None:
    assert_client_error(target, method, path, kwargs)


@pytest.mark.parametrize("target", ["postgresql"], indirect=True)
@pytest.mark.parametrize(("method", "path", "kwargs"), cases(PG))
def test_found_inputs_get_a_client_error_on_postgresql(
    target: Target, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    assert_client_error(target, method, path, kwargs)


def assert_client_error(target: Target, method: str, path: str, kwargs: dict[str, Any]) -> None:
    with target.server.client(timeout=10) as client:
        response = client.request(method, path.format(key=target.key_id, run=target.run_id), **kwargs)
    request_id = response.headers.get("x-request-id")
    assert 400 <= response.status_code < 500, (
        f"{response.status_code} {response.text}\n{server_log_for(target.server, request_id)}"
    )
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("after", ["last", "after-last", "huge"])
def test_following_a_finished_run_from_its_end_ends_at_once(target: Target, after: str) -> None:
    """An SSE client that reconnects with the id of the run's final event (or a later one) gets a stream that
    ends, or a client error: not a stream that hangs open, nor one cut off without its terminating chunk."""
    value = {"last": target.last_event_id, "after-last": target.last_event_id + 10, "huge": BIG}[after]
    with target.server.client(timeout=3) as client:
        try:
            response = client.get(f"/v1/runs/{target.run_id}/events", headers={"Last-Event-ID": str(value)})
        except httpx.ReadTimeout:
            pytest.fail(f"Last-Event-ID {value}: the stream of a finished run stayed open")
        except httpx.RemoteProtocolError as exc:
            pytest.fail(f"Last-Event-ID {value}: the server cut the stream off ({exc})")
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        assert "event:" not in response.text  # nothing after the final event
