"""Who sees what: users see only their own sessions and runs, keys live and die as promised, the
first admin key appears once, and the CLI's key commands act on a running server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import REPO_ROOT, StrataProcess

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


def _config(mock: MockBackend, **extra: Any) -> dict[str, Any]:
    return {
        "models": [mock_model(mock), mock_model(mock, "other-model")],
        "tools": {"functions": [{"name": "record", "import_path": "tests.support.agent_tools:record_call"}]},
        "agents": [
            {"name": "helper", "model": "mock-model"},
            {"name": "approver", "model": "mock-model", "tools": ["record"], "require_approval": ["record"]},
        ],
        "runs": {"poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 2},
        **extra,
    }


@pytest.fixture(scope="module")
def server(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    workdir = tmp_path_factory.mktemp("access")
    env = {"MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(workdir / "effects.log")}
    process = StrataProcess(workdir, _config(mock_backend, security={"key_cache_ttl_s": 1}), env).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


def _run(client: httpx.Client, agent: str = "helper", **body: Any) -> dict[str, Any]:
    response = client.post(f"/v1/agents/{agent}/runs", json={"input": "hello", **body}, timeout=30)
    assert response.status_code in (200, 202), response.text
    return response.json()


def _audit(server: StrataProcess, action: str) -> list[dict[str, Any]]:
    return server.client().get("/admin/audit", params={"action": action, "limit": 1000}).json()["data"]


def test_users_never_see_each_others_sessions_and_runs(server: StrataProcess) -> None:
    alice = server.client(server.create_key("user", name="alice"))
    bob = server.client(server.create_key("user", name="bob"))
    run = _run(alice)
    assert run["status"] == "completed"
    run_id, session_id = run["id"], run["session_id"]
    assert alice.get(f"/v1/runs/{run_id}").status_code == 200

    for method, path in [
        ("GET", f"/v1/runs/{run_id}"),
        ("GET", f"/v1/runs/{run_id}/steps"),
        ("GET", f"/v1/runs/{run_id}/events"),
        ("POST", f"/v1/runs/{run_id}/cancel"),
        ("GET", f"/v1/sessions/{session_id}"),
        ("GET", f"/v1/sessions/{session_id}/messages"),
    ]:
        response = bob.request(method, path)
        assert response.status_code == 404, f"{method} {path}: {response.status_code}"
        assert run_id not in response.text or "no run" in response.json()["error"]["message"]
    denied = bob.post(f"/v1/runs/{run_id}/approval", json={"decision": "approve"})
    assert denied.status_code == 404
    continued = bob.post("/v1/agents/helper/runs", json={"input": "mine now", "session_id": session_id})
    assert continued.status_code == 404  # nobody writes into another user's conversation
    messages = alice.get(f"/v1/sessions/{session_id}/messages").json()["data"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello"]


def test_an_idempotency_key_never_returns_another_users_run(server: StrataProcess) -> None:
    carol = server.client(server.create_key("user", name="carol"))
    dave = server.client(server.create_key("user", name="dave"))
    first = carol.post("/v1/agents/helper/runs", json={"input": "x"}, headers={"Idempotency-Key": "shared-123"})
    assert first.status_code == 200
    again = carol.post("/v1/agents/helper/runs", json={"input": "x"}, headers={"Idempotency-Key": "shared-123"})
    assert again.json()["id"] == first.json()["id"]
    # Dave's key of the same name is his own: a run of his, and no hint that Carol used it.
    other = dave.post("/v1/agents/helper/runs", json={"input": "x"}, headers={"Idempotency-Key": "shared-123"})
    assert other.status_code == 200, other.text
    assert other.json()["id"] != first.json()["id"]
    assert first.json()["id"] not in other.text
    replayed = dave.post("/v1/agents/helper/runs", json={"input": "x"}, headers={"Idempotency-Key": "shared-123"})
    assert replayed.json()["id"] == other.json()["id"]


def test_auditors_read_everyones_runs_and_the_read_is_audited(server: StrataProcess) -> None:
    erin = server.client(server.create_key("user", name="erin"))
    auditor = server.client(server.create_key("auditor", name="audrey"))
    run = _run(erin)
    assert auditor.get(f"/v1/runs/{run['id']}").status_code == 200
    assert auditor.post(f"/v1/runs/{run['id']}/cancel").status_code == 403  # reading is not steering
    reads = [e for e in _audit(server, "data.read_other_user") if e["resource"] == f"run {run['id']!r}"]
    assert reads and reads[-1]["details"]["owner"] == "erin"
    assert reads[-1]["actor_role"] == "auditor"


def test_approvals_are_audited(server: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("record", {"note": "n1"})]), Reply(content="done"))
    frank = server.client(server.create_key("user", name="frank"))
    run = _run(frank, "approver")
    assert run["status"] == "awaiting_approval"
    approved = frank.post(f"/v1/runs/{run['id']}/approval", json={"decision": "approve"})
    assert approved.status_code == 200
    entries = [e for e in _audit(server, "run.approval") if e["resource"] == f"run {run['id']}"]
    assert len(entries) == 1
    assert entries[0]["details"]["decision"] == "approve"
    assert entries[0]["actor"].startswith("key:")


def test_key_grants_limit_models_and_agents(server: StrataProcess) -> None:
    key = server.create_key("user", name="narrow", models=["mock-model"], agents=["helper"])
    narrow = server.client(key)
    assert narrow.post("/v1/chat/completions", json=CHAT).status_code == 200
    refused = narrow.post("/v1/chat/completions", json={**CHAT, "model": "other-model"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert narrow.post("/v1/agents/approver/runs", json={"input": "x"}).status_code == 403
    assert narrow.post("/v1/sessions", json={"agent": "approver"}).status_code == 403


def test_revocation_rotation_expiry_and_role_changes_take_effect(server: StrataProcess) -> None:
    admin = server.client()
    created = admin.post("/admin/keys", json={"name": "life", "role": "user"}).json()
    secret, key_id = created["key"], created["id"]
    assert re.fullmatch(r"sk-strata-[0-9A-Za-z]{49}", secret)
    listed = admin.get("/admin/keys").json()["data"]
    assert secret not in str(listed) and any(k["id"] == key_id and secret.startswith(k["prefix"]) for k in listed)
    user = server.client(secret)
    assert user.get("/v1/models").status_code == 200

    # A role change applies on the next request (the cache is dropped), and is audited as one.
    assert user.get("/admin/deployments").status_code == 403
    assert admin.patch(f"/admin/keys/{key_id}", json={"role": "operator"}).status_code == 200
    assert user.get("/admin/deployments").status_code == 200
    assert any(e["resource"] == f"key {key_id}" for e in _audit(server, "key.role_changed"))

    # Rotation: both secrets work during the overlap; with no overlap the old one stops at once.
    rotated = admin.post(f"/admin/keys/{key_id}/rotate", json={"overlap_s": 3600}).json()
    assert server.client(rotated["key"]).get("/v1/models").status_code == 200
    assert user.get("/v1/models").status_code == 200
    again = admin.post(f"/admin/keys/{rotated['id']}/rotate", json={"overlap_s": 0}).json()
    assert server.client(rotated["key"]).get("/v1/models").status_code == 401
    newest = server.client(again["key"])
    assert newest.get("/admin/deployments").status_code == 200  # grants carried over

    # Revocation: refused on the very next request.
    assert admin.post(f"/admin/keys/{again['id']}/revoke").status_code == 200
    refused = newest.get("/v1/models")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "revoked_api_key"

    # Expiry.
    short = admin.post("/admin/keys", json={"name": "brief", "role": "user", "expires_in_s": 1}).json()
    assert server.client(short["key"]).get("/v1/models").status_code == 200
    time.sleep(1.2)
    expired = server.client(short["key"]).get("/v1/models")
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "expired_api_key"
    actions = {e["action"] for e in server.client().get("/admin/audit", params={"limit": 1000}).json()["data"]}
    assert {"key.created", "key.rotated", "key.revoked", "auth.failed"} <= actions


def test_malformed_and_unknown_keys_are_refused_with_a_reason(server: StrataProcess) -> None:
    good = server.create_key("user", name="typo")
    typo = good[:-1] + ("A" if good[-1] != "A" else "B")
    response = server.client(typo).get("/v1/models")
    assert response.status_code == 401
    assert "checksum" in response.json()["error"]["message"]
    failures = _audit(server, "auth.failed")
    assert failures and failures[-1]["source_ip"] == "127.0.0.1"
    assert good not in str(failures) and typo not in str(failures)


def _cli(server: StrataProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "strata", *args, "--config", str(server.config_path)],
        cwd=server.workdir,
        env={**env, "MOCK_API_KEY": "mock-secret"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_keys_act_on_the_running_server(server: StrataProcess) -> None:
    # A name that looks like terminal markup is shown as text (it once crashed `keys list`).
    made = _cli(server, "keys", "create", "--name", "cli [/ops]", "--role", "developer", "--rpm", "50")
    assert made.returncode == 0, made.stderr
    secret = re.search(r"sk-strata-[0-9A-Za-z]{49}", made.stdout)
    assert secret is not None
    key_id = re.search(r"key_[0-9a-f]{20}", made.stdout)
    assert key_id is not None
    client = server.client(secret.group())
    assert client.get("/v1/me").json()["role"] == "developer"

    listed = _cli(server, "keys", "list")
    assert listed.returncode == 0 and key_id.group() in listed.stdout and secret.group() not in listed.stdout

    revoked = _cli(server, "keys", "revoke", key_id.group())
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 5  # no Redis here: the server re-reads a cached key within key_cache_ttl_s (1 s)
    while client.get("/v1/me").status_code != 401:
        assert time.monotonic() < deadline, "a key revoked from the CLI kept working"
        time.sleep(0.2)
    assert any(e["actor"].startswith("cli:") for e in _audit(server, "key.revoked"))
    missing = _cli(server, "keys", "revoke", "key_doesnotexist")
    assert missing.returncode == 5 and "no API key" in missing.stderr  # NOT_FOUND


def test_the_first_admin_key_is_generated_and_shown_once(mock_backend: MockBackend, tmp_path: Path) -> None:
    process = StrataProcess(tmp_path, _config(mock_backend), {"MOCK_API_KEY": "mock-secret", "STRATA_ADMIN_KEY": ""})
    process.start()
    try:
        found = re.findall(r"sk-strata-[0-9A-Za-z]{49}", process.logs())
        assert len(found) == 1, "the generated admin key must be printed exactly once"
        admin = found[0]
        process.api_key = admin
        assert process.client().get("/admin/keys").status_code == 200
    finally:
        assert process.stop() == 0
    process.start()  # a second start: the key exists, nothing new is generated or shown
    try:
        assert process.client().get("/admin/keys").status_code == 200
        assert re.findall(r"sk-strata-[0-9A-Za-z]{49}", process.logs()) == [admin]
    finally:
        assert process.stop() == 0


def test_short_admin_key_stops_the_start(mock_backend: MockBackend, tmp_path: Path) -> None:
    process = StrataProcess(
        tmp_path, _config(mock_backend), {"MOCK_API_KEY": "mock-secret", "STRATA_ADMIN_KEY": "short"}
    )
    with pytest.raises(RuntimeError, match="STRATA_ADMIN_KEY must be at least 16 characters"):
        process.start()


def test_mistyped_strata_format_admin_key_stops_the_start(mock_backend: MockBackend, tmp_path: Path) -> None:
    """A chosen key that looks like a Strata key but fails its checksum would be refused on every request."""
    env = {"MOCK_API_KEY": "mock-secret", "STRATA_ADMIN_KEY": "sk-strata-my-own-admin-key-123"}
    process = StrataProcess(tmp_path, _config(mock_backend), env)
    with pytest.raises(RuntimeError, match="STRATA_ADMIN_KEY starts with 'sk-strata-' but its checksum does not match"):
        process.start()


def test_config_check_never_prints_credentials(mock_backend: MockBackend, tmp_path: Path) -> None:
    (tmp_path / "strata.yaml").write_text(yaml.safe_dump(_config(mock_backend)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env |= {"MOCK_API_KEY": "mock-secret", "STRATA_ADMIN_KEY": "admin-secret-1234567890", "PYTHONPATH": str(REPO_ROOT)}
    checked = subprocess.run(
        [sys.executable, "-m", "strata", "config", "check", "--json", "--config", str(tmp_path / "strata.yaml")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "admin-secret-1234567890" not in checked.stdout and "mock-secret" not in checked.stdout
