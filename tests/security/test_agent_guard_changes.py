"""Weakening an agent's guards through `PUT /admin/agents/{name}` takes an admin; every change is audited
with who made it and the spec before and after; a run keeps the version it started with, across a crash."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.runs import wait_status
from tests.support.strata_process import StrataProcess

RECORD = {"name": "record", "import_path": "tests.support.agent_tools:record_call"}
VAULT = {
    "name": "vault",
    "model": "mock-model",
    "system_prompt": "Guard the vault.",
    "tools": ["record"],
    "require_approval": ["record"],
    "limits": {"max_steps": 3, "timeout_s": 60},
}


def config(mock: MockBackend, **extra: Any) -> dict[str, Any]:
    return {
        "models": [mock_model(mock), mock_model(mock, "other-model")],
        "tools": {"functions": [RECORD]},
        "agents": [VAULT],
        "runs": {"lease_s": 1.5, "poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
        **extra,
    }


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    workdir = tmp_path_factory.mktemp("guards")
    env = {"MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(workdir / "effects.log")}
    process = StrataProcess(workdir, config(mock_backend), env=env).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


def spec(**changes: Any) -> dict[str, Any]:
    body = {k: v for k, v in VAULT.items() if k != "name"}
    return {**body, **changes}


def key_id(strata: StrataProcess, key: str) -> str:
    with strata.client(key) as client:
        return str(client.get("/v1/me").json()["key_id"])


def published(strata: StrataProcess, name: str) -> list[dict[str, Any]]:
    with strata.client() as admin:
        rows = admin.get("/admin/audit", params={"action": "agent.published", "limit": 1000}).json()["data"]
    return [r for r in rows if r["resource"] == f"agent {name}"]


def test_an_operator_may_not_weaken_guards_and_an_admin_may(strata: StrataProcess) -> None:
    operator_key = strata.create_key("operator", name="ops")
    operator = strata.client(operator_key)
    weakening = {
        "require_approval no longer lists 'record'": spec(require_approval=[]),
        "limits.max_steps raised from 3 to 50": spec(limits={"max_steps": 50, "timeout_s": 60}),
        "limits.timeout_s raised from 60 to 600": spec(limits={"max_steps": 3, "timeout_s": 600}),
        "model changes from 'mock-model' to 'other-model'": spec(model="other-model"),
        "fallback_model changes from None to 'other-model'": spec(fallback_model="other-model"),
        "tools adds 'calculator'": spec(tools=["record", "calculator"]),
    }
    for reason, body in weakening.items():
        refused = operator.put("/admin/agents/vault", json=body)
        assert refused.status_code == 403, (reason, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "guard_weakening_not_allowed"
        assert reason in error["message"], error["message"]
    # A developer is held to the same rule.
    developer = strata.client(strata.create_key("developer", name="dev"))
    assert developer.put("/admin/agents/vault", json=spec(require_approval=[])).status_code == 403
    # Nothing was published: the agent still requires approval.
    assert strata.client().get("/v1/agents/vault").json()["require_approval"] == ["record"]

    # Changes that keep every guard are the operator's to make: a new prompt, tighter limits.
    kept = operator.put(
        "/admin/agents/vault", json=spec(system_prompt="Guard it well.", limits={"max_steps": 2, "timeout_s": 60})
    )
    assert kept.status_code == 200, kept.text
    # An admin may weaken them.
    admin = strata.client()
    loosened = admin.put(
        "/admin/agents/vault", json=spec(require_approval=[], limits={"max_steps": 5, "timeout_s": 60})
    )
    assert loosened.status_code == 200, loosened.text
    assert (loosened.json()["require_approval"], loosened.json()["limits"]["max_steps"]) == ([], 5)
    # And once a cost limit exists, raising it or dropping it weakens the agent.
    admin.put("/admin/agents/vault", json=spec(limits={"max_steps": 5, "timeout_s": 60, "max_cost_usd": 1.0}))
    dropped = operator.put("/admin/agents/vault", json=spec(limits={"max_steps": 5, "timeout_s": 60}))
    assert dropped.status_code == 403
    assert "limits.max_cost_usd raised from 1 to none" in dropped.json()["error"]["message"]

    # The audit trail: the refusals and the publications, each with its caller and the spec before and after.
    rows = published(strata, "vault")
    operator_label = f"key:{key_id(strata, operator_key)}"
    denied = [r for r in rows if r["outcome"] == "denied"]
    assert denied and all(r["actor"] == operator_label or r["actor_role"] == "developer" for r in denied)
    first_denial = next(r for r in denied if r["actor"] == operator_label)
    assert first_denial["details"]["weakens"] == ["require_approval no longer lists 'record'"]
    assert first_denial["details"]["before"]["require_approval"] == ["record"]
    assert first_denial["details"]["after"]["require_approval"] == []
    successes = [r for r in rows if r["outcome"] == "success"]
    by_operator = next(r for r in successes if r["actor"] == operator_label)
    assert by_operator["details"]["weakens"] == []
    assert set(by_operator["details"]["changed"]) == {"system_prompt", "limits.max_steps"}
    assert by_operator["details"]["before"]["limits"]["max_steps"] == 3
    assert by_operator["details"]["after"]["limits"]["max_steps"] == 2
    prompt = by_operator["details"]["after"]["system_prompt"]
    assert set(prompt) == {"sha256", "chars"}, "the audit trail names the prompt by digest, not by its text"
    by_admin = next(
        r for r in successes if r["actor_role"] == "admin" and "require_approval" in r["details"]["changed"]
    )
    assert by_admin["details"]["weakens"] == [
        "require_approval no longer lists 'record'",
        "limits.max_steps raised from 2 to 5",
    ]
    assert (by_admin["details"]["before"]["require_approval"], by_admin["details"]["after"]["require_approval"]) == (
        ["record"],
        [],
    )


def test_a_new_agent_is_measured_against_the_defaults(strata: StrataProcess) -> None:
    operator = strata.client(strata.create_key("operator", name="ops-new"))
    plain = operator.put("/admin/agents/plain", json={"model": "mock-model", "system_prompt": "Hi."})
    assert plain.status_code == 201, plain.text
    armed = operator.put("/admin/agents/armed", json={"model": "mock-model", "tools": ["record"]})
    assert armed.status_code == 403
    assert "tools adds 'record'" in armed.json()["error"]["message"]
    assert (
        strata.client().put("/admin/agents/armed", json={"model": "mock-model", "tools": ["record"]}).status_code == 201
    )


def test_a_run_keeps_its_version_through_a_new_version_and_a_crash(tmp_path: Path) -> None:
    effects = tmp_path / "effects.log"
    with MockBackend(api_key="mock-secret") as mock:
        mock.script(
            Reply(tool_calls=[ToolCallSpec("record", {"label": "one"}, id="c1")]),
            Reply(content="never delivered: the server dies while waiting", latency_s=30),
            Reply(tool_calls=[ToolCallSpec("record", {"label": "two"}, id="c2")]),
            Reply(content="done under version 1"),
        )
        env = {"MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(effects)}
        first = StrataProcess(tmp_path, config(mock), env=env).start()
        run = first.client().post("/v1/agents/vault/runs", json={"input": "go", "mode": "background"}).json()
        paused = wait_status(first, run["id"], ("awaiting_approval",))
        assert paused["agent_version"] == 1
        # Version 2, mid-run: another prompt, no approval needed, a lower step limit.
        newer = first.client().put(
            "/admin/agents/vault", json=spec(system_prompt="Version two.", require_approval=[], limits={"max_steps": 1})
        )
        assert newer.json()["version"] == 2
        assert first.client().post(f"/v1/runs/{run['id']}/approval", json={"decision": "approve"}).status_code == 200
        deadline = time.monotonic() + 15
        while len(mock.chat_requests()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(mock.chat_requests()) == 2, "the run reached its second model call"
        first.kill()

        second = StrataProcess(tmp_path, config(mock), env=env)
        second.port = first.port
        second.config["server"]["port"] = first.port
        second.start()
        try:
            # Re-claimed after the crash, it still runs version 1: its prompt, its step limit (3, not 1), and
            # its guard: the second call waits for approval although version 2 asks for none.
            again = wait_status(second, run["id"], ("awaiting_approval", "completed", "failed"))
            assert again["status"] == "awaiting_approval", again
            assert again["attempts"] == 3, "claimed at the start, after the approval, and after the crash"
            assert again["agent_version"] == 1
            assert [line.split(" ", 1)[1] for line in effects.read_text().splitlines()] == ["one"]
            approved = second.client().post(f"/v1/runs/{again['id']}/approval", json={"decision": "approve"})
            assert approved.status_code == 200
            final = wait_status(second, run["id"], ("completed", "failed"))
            assert (final["status"], final["output"]) == ("completed", "done under version 1"), final
            prompts = {r.body["messages"][0]["content"] for r in mock.chat_requests()}
            assert prompts == {"Guard the vault."}, "every model call of the run used version 1's prompt"
            # A new run gets version 2.
            mock.script(Reply(content="v2"))
            fresh = second.client().post("/v1/agents/vault/runs", json={"input": "hi"}, timeout=30).json()
            assert (fresh["agent_version"], fresh["output"]) == (2, "v2")
            assert mock.chat_requests()[-1].body["messages"][0]["content"] == "Version two."
        finally:
            assert second.stop() == 0


def test_no_api_caller_may_point_an_agent_at_code(strata: StrataProcess) -> None:
    """An `entrypoint` names Python the server imports: only the config file may set it, not even an admin's key."""
    refused = strata.client().put("/admin/agents/coder", json={"model": "mock-model", "entrypoint": "os:system"})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "entrypoint"
    assert "set in the config file" in refused.json()["error"]["message"]
    assert strata.client().get("/v1/agents/coder").status_code == 404
