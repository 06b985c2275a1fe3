"""Agents as code through the runs API on a real server: kill -9 at every step boundary, approvals in the
middle of a function, child runs, non-determinism."""

from __future__ import annotations

import base64
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import mock_model
from tests.support.databases import postgres_database
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


def restart(previous: StrataProcess, config: dict[str, Any], env: dict[str, str]) -> StrataProcess:
    server = StrataProcess(previous.workdir, config, env=env)
    server.port = previous.port
    server.config["server"]["port"] = previous.port
    return server.start()


BOUNDARIES = 6  # tests.support.code_agents:clerk has a boundary before its first call and after each of five


def kill_at_every_boundary(tmp_path: Path, extra: dict[str, Any], replicas: list[str]) -> None:
    """Run `clerk` on `replicas` (servers sharing one database); whichever executes the run dies at its next
    step boundary and is restarted, until the run went through every boundary and completed."""
    effects, kills = tmp_path / "effects.log", tmp_path / "kills"
    kills.mkdir()
    with MockBackend(api_key="mock-secret") as mock:
        mock.script(Reply(content="plan"), Reply(content="all done"))
        config = config_for(
            mock, {"name": "clerk", "model": "mock-model", "tools": ["record"],
                   "entrypoint": "tests.support.code_agents:clerk"}
        )  # fmt: skip
        config.update(extra)
        env = {
            "MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(effects), "TEST_KILL_DIR": str(kills),
            "STRATA_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),  # replicas share the database's key
        }  # fmt: skip
        servers = [StrataProcess(tmp_path / name, config, env=env).start() for name in replicas]
        created = httpx.post(
            f"{servers[0].url}/v1/agents/clerk/runs", json={"input": "go", "mode": "background"},
            headers=servers[0].headers,
        )  # fmt: skip
        assert created.status_code == 202
        run_id = created.json()["id"]
        for boundary in range(BOUNDARIES):  # each execution dies at the next boundary it reaches for the first time
            deadline = time.monotonic() + 30
            while not any(s.process is not None and s.process.poll() is not None for s in servers):
                assert time.monotonic() < deadline, f"no server died at boundary {boundary}"
                time.sleep(0.05)
            index = next(i for i, s in enumerate(servers) if s.process is not None and s.process.poll() is not None)
            assert servers[index].process is not None and servers[index].process.returncode == -signal.SIGKILL
            assert (kills / f"boundary-{boundary}").exists()
            servers[index] = restart(servers[index], config, env)
        try:
            final = wait_ended(servers[0], run_id)
            assert (final["status"], final["output"]) == ("completed", "all done")
            assert final["attempts"] == BOUNDARIES + 1
            assert effects.read_text().splitlines() == [
                "step plan plan",
                f"{run_id}:2 plan-a",
                f"{run_id}:3 plan-b",
            ], "the step and each tool call ran exactly once across six crashes"
            assert len(mock.chat_requests()) == 2, "each model step was made once"
            assert final["steps_taken"] == 2
        finally:
            for server in servers:
                assert server.stop() == 0


@pytest.mark.slow
def test_a_code_agent_killed_at_every_step_boundary_runs_each_step_once(tmp_path: Path) -> None:
    kill_at_every_boundary(tmp_path, {}, ["a"])


@pytest.mark.slow
def test_a_code_agent_killed_at_every_step_boundary_on_two_postgres_replicas(tmp_path: Path) -> None:
    with postgres_database() as database_url:
        kill_at_every_boundary(tmp_path, {"database_url": database_url}, ["a", "b"])


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
            {"name": "broken", "model": "mock-model", "entrypoint": "tests.support.code_agents:broken"},
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


def test_a_code_agent_streams_its_model_text_as_it_is_written(examples_server: Any) -> None:
    server, mock = examples_server
    mock.reset()
    mock.script(Reply(content="Tech it is"), Reply(content="Restart the router."))
    with httpx.stream(
        "POST", f"{server.url}/v1/agents/router/runs", json={"input": "wifi down", "mode": "stream"},
        headers=server.headers, timeout=30,
    ) as response:  # fmt: skip
        assert response.status_code == 200
        events = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "run.completed"
    model_step = events.index("step.started")
    assert events[model_step + 1 : model_step + 4] == ["message.delta"] * 3, "each word as the model writes it"
    assert "step.completed" in events, "the child run's step"


def test_an_exception_in_the_agent_code_fails_the_run_with_it(examples_server: Any) -> None:
    server, _ = examples_server
    run = start(server, "broken", "go")
    assert (run["status"], run["status_reason"]) == ("failed", "agent error: RuntimeError: the agent's own bug")
    steps = httpx.get(f"{server.url}/v1/runs/{run['id']}/steps", headers=server.headers).json()["data"]
    assert [(s["kind"], s["name"], s["status"], s["output"]) for s in steps] == [
        ("step", "count", "completed", {"value": 3})
    ]
