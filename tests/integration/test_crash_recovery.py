"""kill -9 in the middle of a run: after a restart the run finishes from its last completed step,
and no completed tool call is executed a second time."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess


def record(label: str, call_id: str) -> ToolCallSpec:
    return ToolCallSpec("record", {"label": label}, id=call_id)


def test_a_killed_server_resumes_the_run_without_repeating_tools(tmp_path: Path) -> None:
    effects = tmp_path / "effects.log"
    with MockBackend(api_key="mock-secret") as mock:
        mock.script(
            Reply(tool_calls=[record("first", "c1")]),
            Reply(tool_calls=[record("second", "c2"), record("third", "c3")]),  # two calls in parallel
            Reply(content="never delivered: the server dies while waiting", latency_s=30),
            Reply(content="all three recorded"),
        )
        config = {
            "models": [mock_model(mock)],
            "tools": {"functions": [{"name": "record", "import_path": "tests.support.agent_tools:record_call"}]},
            "agents": [{"name": "clerk", "model": "mock-model", "tools": ["record"]}],
            "runs": {"lease_s": 1.5, "poll_s": 0.1},
        }
        env = {"MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(effects)}
        first = StrataProcess(tmp_path, config, env=env).start()
        run = httpx.post(
            f"{first.url}/v1/agents/clerk/runs",
            json={"input": "record three", "mode": "background"},
            headers=first.headers,
        )
        assert run.status_code == 202
        assert run.json()["status"] == "running", "handed off: created already claimed by this replica's worker"
        run_id = run.json()["id"]
        deadline = time.monotonic() + 15
        while len(mock.chat_requests()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(mock.chat_requests()) == 3, "the run reached its third model call"
        first.kill()

        second = StrataProcess(tmp_path, config, env=env)
        second.port = first.port
        second.config["server"]["port"] = first.port
        second.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                final = httpx.get(f"{second.url}/v1/runs/{run_id}", headers=second.headers).json()
                if final["status"] in ("completed", "failed"):
                    break
                time.sleep(0.1)
            assert (final["status"], final["output"]) == ("completed", "all three recorded")
            assert final["attempts"] == 2
            lines = effects.read_text().splitlines()
            assert sorted(lines) == sorted([f"{run_id}:0:c1 first", f"{run_id}:1:c2 second", f"{run_id}:1:c3 third"]), (
                "each tool call ran exactly once, across the crash"
            )
            events = httpx.get(f"{second.url}/v1/runs/{run_id}/events", headers=second.headers, timeout=10).text
            assert "event: run.resumed" in events
            # The resumed model call saw every tool result from before the crash.
            last = mock.chat_requests()[-1].body
            assert sorted(m["content"] for m in last["messages"] if m["role"] == "tool") == [
                "recorded first",
                "recorded second",
                "recorded third",
            ]
        finally:
            assert second.stop() == 0
