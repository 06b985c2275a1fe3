"""Agents as code through the runs API on a real server: kill -9 at every step boundary, approvals in the
middle of a function, child runs, non-determinism."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess

RECORD = {"name": "record", "import_path": "tests.support.agent_tools:record_call"}


def config_for(mock: MockBackend, *agents: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": [mock_model(mock)],
        "tools": {"functions": [RECORD]},
        "agents": list(agents),
        "runs": {"lease_s": 1.0, "poll_s": 0.1},
    }


def wait_ended(server: StrataProcess, run_id: str, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        run = httpx.get(f"{server.url}/v1/runs/{run_id}", headers=server.headers).json()
        if run["status"] in ("completed", "failed", "cancelled", "awaiting_approval") or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def restart(previous: StrataProcess, tmp_path: Path, config: dict[str, Any], env: dict[str, str]) -> StrataProcess:
    server = StrataProcess(tmp_path, config, env=env)
    server.port = previous.port
    server.config["server"]["port"] = previous.port
    return server.start()


@pytest.mark.slow
def test_a_code_agent_killed_at_every_step_boundary_runs_each_step_once(tmp_path: Path) -> None:
    effects, kills = tmp_path / "effects.log", tmp_path / "kills"
    kills.mkdir()
    with MockBackend(api_key="mock-secret") as mock:
        mock.script(Reply(content="plan"), Reply(content="all done"))
        config = config_for(
            mock, {"name": "clerk", "model": "mock-model", "tools": ["record"],
                   "entrypoint": "tests.support.code_agents:clerk"}
        )  # fmt: skip
        env = {"MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(effects), "TEST_KILL_DIR": str(kills)}
        server = StrataProcess(tmp_path, config, env=env).start()
        created = httpx.post(
            f"{server.url}/v1/agents/clerk/runs", json={"input": "go", "mode": "background"}, headers=server.headers
        )
        assert created.status_code == 202
        run_id = created.json()["id"]
        for boundary in range(6):  # each execution dies at the next boundary it reaches for the first time
            assert server.process is not None and server.process.wait(30) == -signal.SIGKILL
            assert (kills / f"boundary-{boundary}").exists()
            server = restart(server, tmp_path, config, env)
        try:
            final = wait_ended(server, run_id)
            assert (final["status"], final["output"]) == ("completed", "all done")
            assert final["attempts"] == 7
            assert effects.read_text().splitlines() == [
                "step plan plan",
                f"{run_id}:2 plan-a",
                f"{run_id}:3 plan-b",
            ], "the step and each tool call ran exactly once across six crashes"
            assert len(mock.chat_requests()) == 2, "each model step was made once"
            steps = httpx.get(f"{server.url}/v1/runs/{run_id}", headers=server.headers).json()
            assert steps["steps_taken"] == 2
        finally:
            assert server.stop() == 0


@pytest.fixture(scope="module")
def examples_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp_path = tmp_path_factory.mktemp("examples")
    with MockBackend(api_key="mock-secret") as mock:
        agents = [
            {"name": "router", "model": "mock-model", "entrypoint": "examples.router:route"},
            {"name": "billing", "model": "mock-model", "system_prompt": "billing desk"},
            {"name": "tech", "model": "mock-model", "system_prompt": "tech desk"},
            {"name": "planner", "model": "mock-model", "entrypoint": "examples.plan_execute:plan_and_execute"},
            {"name": "research", "model": "mock-model", "entrypoint": "examples.fan_out:research"},
            {"name": "researcher", "model": "mock-model"},
            {"name": "wanders", "model": "mock-model", "tools": ["record"],
             "entrypoint": "tests.support.code_agents:wanders"},
        ]  # fmt: skip
        env = {
            "MOCK_API_KEY": "mock-secret",
            "TEST_SIDE_EFFECTS_LOG": str(tmp_path / "effects.log"),
            "TEST_WANDER_FILE": str(tmp_path / "wander.txt"),
        }
        server = StrataProcess(tmp_path, config_for(mock, *agents), env=env).start()
        try:
            yield server, mock
        finally:
            assert server.stop() == 0


def start(server: StrataProcess, agent: str, text: str) -> dict[str, Any]:
    response = httpx.post(
        f"{server.url}/v1/agents/{agent}/runs", json={"input": text, "mode": "background"}, headers=server.headers
    )
    assert response.status_code == 202, response.text
    return wait_ended(server, response.json()["id"])


def test_the_router_hands_the_question_to_the_specialist_it_picks(examples_server: Any) -> None:
    server, mock = examples_server
    mock.reset()
    mock.script(Reply(content="Billing"), Reply(content="Your invoice is paid."))
    run = start(server, "router", "was my invoice paid?")
    assert (run["status"], run["output"]) == ("completed", "Your invoice is paid.")
    specialist = mock.chat_requests()[-1].body["messages"]
    assert specialist[0] == {"role": "system", "content": "billing desk"}


def test_plan_and_execute_waits_for_an_approver_then_runs_the_edited_plan(examples_server: Any) -> None:
    server, mock = examples_server
    mock.reset()
    mock.script(Reply(content="1. look\n2. leap"), Reply(content="looked carefully"))
    run = start(server, "planner", "cross the road")
    assert run["status"] == "awaiting_approval"
    (pending,) = run["pending_approval"]
    assert pending["name"] == "execute plan"
    assert '"steps":["look","leap"]' in pending["arguments"]
    decided = httpx.post(
        f"{server.url}/v1/runs/{run['id']}/approval",
        json={"decision": "approve", "binding": pending["binding"], "arguments": {"steps": ["look twice"]}},
        headers=server.headers,
    )
    assert decided.status_code == 200, decided.text
    run = wait_ended(server, run["id"])
    assert (run["status"], run["output"]) == ("completed", "- look twice: looked carefully")
    assert len(mock.chat_requests()) == 2, "the plan was not made again after the pause"


def test_a_denied_plan_ends_the_run_with_the_reason(examples_server: Any) -> None:
    server, mock = examples_server
    mock.reset()
    mock.script(Reply(content="1. jump"))
    run = start(server, "planner", "leave")
    pending = run["pending_approval"][0]
    httpx.post(
        f"{server.url}/v1/runs/{run['id']}/approval",
        json={"decision": "deny", "binding": pending["binding"], "comment": "too far"},
        headers=server.headers,
    )
    assert wait_ended(server, run["id"])["output"] == "Plan rejected: too far"


def test_a_fan_out_merges_every_child_run(examples_server: Any) -> None:
    server, mock = examples_server
    mock.reset()
    mock.default = Reply(echo=True)  # each researcher answers with its own question
    run = start(server, "research", "cats, dogs")
    assert (run["status"], run["output"]) == (
        "completed",
        "cats: Summarise in one line: cats\ndogs: Summarise in one line: dogs",
    )
    assert len(mock.chat_requests()) == 2, "one child run per topic"


def test_a_function_that_calls_something_else_on_re_entry_fails_with_non_determinism(examples_server: Any) -> None:
    server, _ = examples_server
    wander = server.workdir / "wander.txt"
    wander.write_text("first")
    run = start(server, "wanders", "go")
    assert run["status"] == "awaiting_approval"
    wander.write_text("second")  # the code now decides otherwise than the journal recorded
    httpx.post(
        f"{server.url}/v1/runs/{run['id']}/approval", json={"decision": "approve"}, headers=server.headers
    ).raise_for_status()
    run = wait_ended(server, run["id"])
    assert run["status"] == "failed"
    assert run["status_reason"].startswith("non-determinism:")
    assert "durable call 0 is tool 'record' with other input" in run["status_reason"]
