"""An approval binds to one pending call (run, step, call id, tool, arguments), never to a call id the model
chose: a later call that reuses the id is a new call that waits for its own approval."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess

RECORD = "tests.support.agent_tools:record_call"


@pytest.fixture(scope="module")
def effects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("effects") / "calls.log"


@pytest.fixture(scope="module")
def strata(
    mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory, effects: Path
) -> Iterator[StrataProcess]:
    config = {
        "models": [mock_model(mock_backend)],
        "tools": {"functions": [{"name": "record", "import_path": RECORD}, {"name": "note", "import_path": RECORD}]},
        "agents": [
            {
                "name": "guarded",
                "model": "mock-model",
                "tools": ["record", "note"],
                "require_approval": ["record", "note"],
                "limits": {"max_steps": 10, "loop_repeats": 10},
            }
        ],
        "runs": {"lease_s": 2, "poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    env = {"MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(effects)}
    process = StrataProcess(tmp_path_factory.mktemp("approvals"), config, env=env).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


def call(tool: str, label: str, call_id: str = "dup") -> ToolCallSpec:
    return ToolCallSpec(tool, {"label": label}, id=call_id)


def done(effects: Path) -> list[str]:
    """The labels of the calls that ran."""
    return [line.split(" ", 1)[1] for line in effects.read_text().splitlines()] if effects.exists() else []


def settle(strata: StrataProcess, run_id: str, seen: set[str]) -> dict[str, Any]:
    """The run once it waits on calls not approved before (bindings not in `seen`) or has ended."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        run = httpx.get(f"{strata.url}/v1/runs/{run_id}", headers=strata.headers).json()
        if run["status"] in ("completed", "failed", "cancelled"):
            return run
        pending = run["pending_approval"] or []
        if run["status"] == "awaiting_approval" and not {c["binding"] for c in pending} & seen:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not settle: {run}")


def approve(strata: StrataProcess, run_id: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{strata.url}/v1/runs/{run_id}/approval", json={"decision": "approve", **body}, headers=strata.headers
    )


def requested(strata: StrataProcess, run_id: str) -> list[list[dict[str, Any]]]:
    """The calls of each approval.requested event of the run, in order."""
    events = httpx.get(f"{strata.url}/v1/runs/{run_id}/events", headers=strata.headers, timeout=10).text
    return [
        json.loads(block.split("data: ", 1)[1])["calls"]
        for block in events.split("\n\n")
        if "event: approval.requested" in block
    ]


def test_a_reused_call_id_needs_its_own_approval_each_time(
    strata: StrataProcess, mock_backend: MockBackend, effects: Path
) -> None:
    mock_backend.script(
        Reply(tool_calls=[call("record", "first")]),
        Reply(tool_calls=[call("record", "second: other arguments")]),  # same id and tool, later step
        Reply(tool_calls=[call("note", "third: another tool")]),  # same id, another tool
        Reply(tool_calls=[call("record", "4a"), call("note", "4b"), call("record", "4c")]),  # one id, three calls
        Reply(content="all done"),
    )
    run = httpx.post(
        f"{strata.url}/v1/agents/guarded/runs", json={"input": "go", "mode": "background"}, headers=strata.headers
    ).json()
    run_id, seen = run["id"], set()

    first = settle(strata, run_id, seen)
    assert first["status"] == "awaiting_approval"
    [pending] = first["pending_approval"]
    assert (pending["id"], pending["name"], pending["turn"]) == ("dup", "record", 0)
    seen.add(pending["binding"])
    assert approve(strata, run_id, call_id="dup", binding=pending["binding"]).status_code == 200

    # The same id in the next step, with other arguments: a new call, paused for its own approval.
    second = settle(strata, run_id, seen)
    assert second["status"] == "awaiting_approval", "a call reusing an approved call id ran without approval"
    [pending] = second["pending_approval"]
    assert (pending["id"], pending["name"], pending["turn"]) == ("dup", "record", 1)
    assert pending["binding"] not in seen
    assert done(effects) == ["first"], "the second call ran before it was approved"
    stale = approve(strata, run_id, call_id="dup", binding=next(iter(seen)))
    assert stale.status_code == 409, stale.text
    assert stale.json()["error"]["code"] == "stale_approval"
    assert done(effects) == ["first"]
    seen.add(pending["binding"])
    assert approve(strata, run_id, binding=pending["binding"]).status_code == 200

    # The same id again, for another tool: paused again; approved by call id alone, it applies to this call only.
    third = settle(strata, run_id, seen)
    assert third["status"] == "awaiting_approval"
    [pending] = third["pending_approval"]
    assert (pending["id"], pending["name"], pending["turn"]) == ("dup", "note", 2)
    assert done(effects) == ["first", "second: other arguments"]
    seen.add(pending["binding"])
    assert approve(strata, run_id, call_id="dup").status_code == 200

    # Three calls sharing one id in one step: three calls, each pending, none run before the approval.
    fourth = settle(strata, run_id, seen)
    assert fourth["status"] == "awaiting_approval"
    pending_calls = fourth["pending_approval"]
    assert [(c["name"], c["turn"]) for c in pending_calls] == [("record", 3), ("note", 3), ("record", 3)]
    assert len({c["id"] for c in pending_calls}) == 3 and len({c["binding"] for c in pending_calls}) == 3
    assert done(effects) == ["first", "second: other arguments", "third: another tool"]
    assert approve(strata, run_id).status_code == 200

    final = settle(strata, run_id, seen | {c["binding"] for c in pending_calls})
    assert (final["status"], final["output"]) == ("completed", "all done"), final
    assert sorted(done(effects)[3:]) == ["4a", "4b", "4c"]
    # One approval.requested event per step, each naming its own calls.
    events = requested(strata, run_id)
    assert [[(c["name"], c["turn"]) for c in calls] for calls in events] == [
        [("record", 0)],
        [("record", 1)],
        [("note", 2)],
        [("record", 3), ("note", 3), ("record", 3)],
    ]
    keys = [line.split(" ", 1)[0] for line in effects.read_text().splitlines()[-3:]]
    assert len(set(keys)) == 3, "each of the three calls ran under its own idempotency key"


def test_edited_arguments_apply_to_the_approved_call_only(
    strata: StrataProcess, mock_backend: MockBackend, effects: Path
) -> None:
    mock_backend.script(
        Reply(tool_calls=[call("record", "pay $1000", "pay")]),
        Reply(tool_calls=[call("record", "pay $5000", "pay")]),
        Reply(content="paid"),
    )
    run_id = httpx.post(
        f"{strata.url}/v1/agents/guarded/runs", json={"input": "pay", "mode": "background"}, headers=strata.headers
    ).json()["id"]
    first = settle(strata, run_id, set())
    binding = first["pending_approval"][0]["binding"]
    edited = approve(strata, run_id, binding=binding, arguments={"label": "pay $10"})
    assert edited.status_code == 200
    second = settle(strata, run_id, {binding})
    assert second["status"] == "awaiting_approval", "the edited approval carried over to a later call"
    assert second["pending_approval"][0]["arguments"] == '{"label":"pay $5000"}'
    assert done(effects)[-1] == "pay $10"
    denied = httpx.post(
        f"{strata.url}/v1/runs/{run_id}/approval",
        json={"decision": "deny", "binding": second["pending_approval"][0]["binding"]},
        headers=strata.headers,
    )
    assert denied.status_code == 200
    assert settle(strata, run_id, {binding, second["pending_approval"][0]["binding"]})["status"] == "completed"
    assert "pay $5000" not in done(effects)


def test_a_binding_from_another_run_is_stale(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(
        Reply(tool_calls=[call("record", "a")]), Reply(tool_calls=[call("record", "a")]), Reply(content="x")
    )
    start = {"input": "go", "mode": "background"}
    one = httpx.post(f"{strata.url}/v1/agents/guarded/runs", json=start, headers=strata.headers).json()["id"]
    two = httpx.post(f"{strata.url}/v1/agents/guarded/runs", json=start, headers=strata.headers).json()["id"]
    first, second = settle(strata, one, set()), settle(strata, two, set())
    # The same call (id, tool, arguments, step) in two runs: each run's approval is its own.
    assert first["pending_approval"][0]["binding"] != second["pending_approval"][0]["binding"]
    refused = approve(strata, two, binding=first["pending_approval"][0]["binding"])
    assert refused.status_code == 409
    assert "no longer pending" in refused.json()["error"]["message"]
    for run_id in (one, two):
        httpx.post(f"{strata.url}/v1/runs/{run_id}/cancel", headers=strata.headers)
