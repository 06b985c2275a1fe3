"""Agent runs against a real `strata serve` and the scripted mock model: the loop, tools, sessions,
modes, guards, approval, cancellation, backpressure, fallback, SSE resume and WebSocket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess


def agent(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": "mock-model", "system_prompt": "You are a test agent.", **extra}


@pytest.fixture(scope="module")
def side_effects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("effects") / "calls.log"


@pytest.fixture(scope="module")
def strata(
    mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory, side_effects: Path
) -> Iterator[StrataProcess]:
    workdir = tmp_path_factory.mktemp("agents")
    config = {
        "models": [
            mock_model(mock_backend, input_usd_per_mtok=1000.0, output_usd_per_mtok=2000.0),
            {"kind": "openai", "name": "mock-down", "base_url": "http://127.0.0.1:9/v1"},
        ],
        "tools": {
            "functions": [
                {"name": "record", "import_path": "tests.support.agent_tools:record_call", "risk": "high"},
            ]
        },
        "agents": [
            agent("helper", tools=["calculator", "record"]),
            agent("approver", tools=["record"], require_approval=["record"]),
            agent("short", tools=["calculator"], limits={"max_steps": 2}),
            agent("decisive", tools=["calculator"], limits={"tool_rounds": 1}),
            agent("thrifty", limits={"max_tokens": 50}),
            agent("budget", limits={"max_cost_usd": 0.01}),
            agent("hasty", limits={"timeout_s": 1.5}),
            agent("queueing", double_texting="enqueue"),
            agent("interrupting", double_texting="interrupt"),
            agent("resilient", model="mock-down", fallback_model="mock-model"),
        ],
        "runs": {"lease_s": 2, "poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    env = {"MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(side_effects)}
    process = StrataProcess(workdir, config, env=env).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


def start(strata: StrataProcess, agent_name: str, text: str, **body: Any) -> httpx.Response:
    headers = {**strata.headers, **body.pop("headers", {})}
    return httpx.post(
        f"{strata.url}/v1/agents/{agent_name}/runs", json={"input": text, **body}, headers=headers, timeout=30
    )


def wait_status(strata: StrataProcess, run_id: str, statuses: tuple[str, ...], timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = httpx.get(f"{strata.url}/v1/runs/{run_id}", headers=strata.headers).json()
        if run["status"] in statuses:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached {statuses}: {run}")


def cli_env(strata: StrataProcess) -> dict[str, str]:
    """The environment of a `strata` CLI command that talks to this server with its admin key."""
    return {**os.environ, "STRATA_API_KEY": strata.api_key}


def strata_cli(strata: StrataProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`strata <args> --url <this server>` with its admin key."""
    return subprocess.run(
        [sys.executable, "-m", "strata", *args, "--url", strata.url],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(strata),
    )


def calc(expression: str) -> Reply:
    return Reply(tool_calls=[ToolCallSpec("calculator", {"expression": expression})])


def test_sync_run_calls_a_tool_and_answers(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(calc("6*7"), Reply(content="It is 42."))
    response = start(strata, "helper", "What is 6 times 7?")
    assert response.status_code == 200, response.text
    run = response.json()
    assert (run["status"], run["output"], run["steps_taken"]) == ("completed", "It is 42.", 2)
    assert [(s["kind"], s["status"]) for s in run["steps"]] == [
        ("model", "completed"),
        ("tool", "completed"),
        ("model", "completed"),
    ]
    assert run["steps"][1]["output"]["content"] == "42"
    assert run["steps"][2]["input"] == {"messages": 4, "tools": ["calculator", "record"]}  # system, user, call, result
    assert run["steps"][1]["idempotency_key"] == f"{run['id']}:0:call_0"
    # The model saw the system prompt, the question, its own tool call and the tool's result.
    second = mock_backend.chat_requests()[-1].body
    assert second["messages"][0] == {"role": "system", "content": "You are a test agent."}
    assert second["messages"][-1]["role"] == "tool" and second["messages"][-1]["content"] == "42"
    assert second["tool_choice"] == "auto"
    assert {t["function"]["name"] for t in second["tools"]} == {"calculator", "record"}
    assert run["usage"]["total_tokens"] > 0
    assert run["cost_usd"] > 0


def test_stream_mode_emits_the_documented_events(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(calc("1+1"), Reply(content="two words"))
    with (
        strata.client(timeout=30) as client,
        connect_sse(
            client, "POST", f"{strata.url}/v1/agents/helper/runs", json={"input": "1+1?", "mode": "stream"}
        ) as source,
    ):
        events = [(e.event, e.id, json.loads(e.data)) for e in source.iter_sse()]
    types = [t for t, _, _ in events]
    assert types[:3] == ["run.created", "run.started", "step.started"]
    assert types[-1] == "run.completed"
    for expected in ("tool.called", "tool.result", "message.completed", "message.delta"):
        assert expected in types
    assert "".join(d["content"] for t, _, d in events if t == "message.delta") == "two words"
    stored_ids = [int(i) for t, i, _ in events if t != "message.delta"]
    assert stored_ids == sorted(stored_ids) and len(set(stored_ids)) == len(stored_ids)
    assert all(d["seq"] is None for t, _, d in events if t == "message.delta")  # deltas are live only, never stored
    assert events[-1][2]["output"] == "two words"


def test_background_mode_returns_202_and_the_run_finishes(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="done later", latency_s=0.3))
    response = start(strata, "helper", "take your time", mode="background")
    assert response.status_code == 202
    assert response.headers["location"] == f"/v1/runs/{response.json()['id']}"
    assert wait_status(strata, response.json()["id"], ("completed",))["output"] == "done later"


def test_idempotency_key_returns_the_same_run(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="once"))
    first = start(strata, "helper", "hi", headers={"Idempotency-Key": "order-77"})
    second = start(strata, "helper", "hi again", headers={"Idempotency-Key": "order-77"})
    assert first.json()["id"] == second.json()["id"]
    assert len(mock_backend.chat_requests()) == 1


def test_sessions_keep_history_across_runs(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="Nice to meet you, Ada."), Reply(content="Your name is Ada."))
    first = start(strata, "helper", "My name is Ada.").json()
    second = start(strata, "helper", "What is my name?", session_id=first["session_id"]).json()
    assert second["session_id"] == first["session_id"]
    contents = [m.get("content") for m in mock_backend.chat_requests()[-1].body["messages"]]
    assert contents == ["You are a test agent.", "My name is Ada.", "Nice to meet you, Ada.", "What is my name?"]
    messages = httpx.get(f"{strata.url}/v1/sessions/{first['session_id']}/messages", headers=strata.headers).json()[
        "data"
    ]
    assert [(m["role"], m["content"]) for m in messages][-1] == ("assistant", "Your name is Ada.")
    assert [m["run_id"] for m in messages] == [first["id"]] * 2 + [second["id"]] * 2


def test_session_created_explicitly_and_unknown_ones_are_404(strata: StrataProcess) -> None:
    created = httpx.post(
        f"{strata.url}/v1/sessions", json={"agent": "helper", "metadata": {"team": "x"}}, headers=strata.headers
    )
    assert created.status_code == 201 and created.json()["metadata"] == {"team": "x"}
    assert (
        httpx.get(f"{strata.url}/v1/sessions/{created.json()['id']}", headers=strata.headers).json()["active_runs"]
        == []
    )
    assert httpx.get(f"{strata.url}/v1/sessions/sess_nope", headers=strata.headers).status_code == 404
    assert start(strata, "helper", "x", session_id="sess_nope").status_code == 404
    assert start(strata, "nobody", "x").status_code == 404


def test_double_texting_reject_is_409(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="slow", latency_s=1.0))
    first = start(strata, "helper", "one", mode="background").json()
    second = start(strata, "helper", "two", session_id=first["session_id"])
    assert second.status_code == 409
    assert second.json()["error"]["run_id"] == first["id"]
    wait_status(strata, first["id"], ("completed",))


def test_double_texting_enqueue_runs_in_order(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="first answer", latency_s=0.5), Reply(content="second answer"))
    first = start(strata, "queueing", "one", mode="background").json()
    second = start(strata, "queueing", "two", session_id=first["session_id"], mode="background").json()
    assert wait_status(strata, second["id"], ("completed",))["output"] == "second answer"
    assert wait_status(strata, first["id"], ("completed",))["output"] == "first answer"
    contents = [m.get("content") for m in mock_backend.chat_requests()[-1].body["messages"]]
    assert contents[1:] == ["one", "first answer", "two"]


def test_double_texting_interrupt_cancels_the_running_run(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="never seen", latency_s=5), Reply(content="the new answer"))
    first = start(strata, "interrupting", "one", mode="background").json()
    wait_status(strata, first["id"], ("running",))
    time.sleep(0.3)
    second = start(strata, "interrupting", "two", session_id=first["session_id"])
    assert second.json()["output"] == "the new answer"
    assert wait_status(strata, first["id"], ("cancelled",))["status_reason"] == "cancelled by request"


def test_step_limit_ends_the_run(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(calc("1+1"), calc("2+2"), calc("3+3"))
    run = start(strata, "short", "keep going").json()
    assert run["status"] == "failed"
    assert run["status_reason"] == "step limit: 2 model steps without a final answer"


def test_repeating_the_same_call_is_a_loop(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(*(calc("9*9") for _ in range(3)))
    run = start(strata, "helper", "loop").json()
    assert run["status"] == "failed"
    assert run["status_reason"].startswith('loop detected: calculator({"expression":"9*9"}) called 3 times')


def test_alternating_calls_are_a_loop(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(calc("1+1"), calc("2+2"), calc("1+1"), calc("2+2"))
    run = start(strata, "helper", "ping pong").json()
    assert run["status"] == "failed"
    assert run["status_reason"].startswith("loop detected: alternating between calculator")


def test_token_limit_ends_the_run(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("x", {})], prompt_tokens=40, completion_tokens=20))
    run = start(strata, "thrifty", "spend").json()
    assert (run["status"], run["status_reason"]) == ("failed", "token limit: 60 >= 50")


def test_cost_limit_ends_the_run(strata: StrataProcess, mock_backend: MockBackend) -> None:
    # 11 prompt tokens at $1000/M + 5 completion at $2000/M = $0.021, over the $0.01 budget.
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("x", {})], prompt_tokens=11, completion_tokens=5))
    run = start(strata, "budget", "spend").json()
    assert run["status"] == "failed"
    assert run["status_reason"] == "cost limit: $0.0210 >= $0.01"


def test_wall_clock_timeout_ends_the_run(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="too late", latency_s=3))
    run = start(strata, "hasty", "hurry").json()
    assert (run["status"], run["status_reason"]) == ("failed", "timeout: the run exceeded its 1.5s limit")


def test_unknown_tool_becomes_an_error_result_for_the_model(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("rm_rf", {})]), Reply(content="sorry"))
    run = start(strata, "helper", "do it").json()
    assert run["status"] == "completed"
    assert run["steps"][1]["status"] == "failed"
    assert "unknown tool 'rm_rf'" in mock_backend.chat_requests()[-1].body["messages"][-1]["content"]


def test_cancel_a_running_run(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="never", latency_s=10))
    run = start(strata, "helper", "long", mode="background").json()
    wait_status(strata, run["id"], ("running",))
    cancelled = httpx.post(f"{strata.url}/v1/runs/{run['id']}/cancel", headers=strata.headers)
    assert cancelled.status_code == 200
    final = wait_status(strata, run["id"], ("cancelled",), timeout_s=5)
    assert final["status_reason"] == "cancelled by request"


def test_approval_pauses_then_runs_the_edited_call(
    strata: StrataProcess, mock_backend: MockBackend, side_effects: Path
) -> None:
    mock_backend.script(
        Reply(tool_calls=[ToolCallSpec("record", {"label": "transfer $1000"}, id="call_pay")]), Reply(content="paid")
    )
    run = start(strata, "approver", "pay the invoice").json()
    assert run["status"] == "awaiting_approval"
    [pending] = run["pending_approval"]
    assert {k: pending[k] for k in ("id", "name", "arguments", "turn")} == {
        "id": "call_pay",
        "name": "record",
        "arguments": '{"label":"transfer $1000"}',
        "turn": 0,
    }
    assert len(pending["binding"]) == 32  # what an approver sends back to approve this very call
    assert "transfer" not in (side_effects.read_text() if side_effects.exists() else "")
    approved = httpx.post(
        f"{strata.url}/v1/runs/{run['id']}/approval",
        json={"decision": "approve", "call_id": "call_pay", "arguments": {"label": "transfer $10"}},
        headers=strata.headers,
    )
    assert approved.status_code == 200
    assert wait_status(strata, run["id"], ("completed",))["output"] == "paid"
    assert f"{run['id']}:0:call_pay transfer $10" in side_effects.read_text().splitlines()


def test_denied_call_is_reported_to_the_model(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(
        Reply(tool_calls=[ToolCallSpec("record", {"label": "x"}, id="c1")]), Reply(content="ok, not done")
    )
    run = start(strata, "approver", "do x").json()
    denied = httpx.post(
        f"{strata.url}/v1/runs/{run['id']}/approval",
        json={"decision": "deny", "comment": "no way"},
        headers=strata.headers,
    )
    assert denied.status_code == 200
    assert wait_status(strata, run["id"], ("completed",))["output"] == "ok, not done"
    assert mock_backend.chat_requests()[-1].body["messages"][-1]["content"] == (
        "Error: The call was denied by an approver. no way"
    )
    again = httpx.post(
        f"{strata.url}/v1/runs/{run['id']}/approval", json={"decision": "approve"}, headers=strata.headers
    )
    assert again.status_code == 409


def test_backpressure_waits_instead_of_failing(strata: StrataProcess, mock_backend: MockBackend) -> None:
    # Each refusal outlasts the serving layer's own retries (3 attempts), so the run itself must wait.
    mock_backend.script(
        *[Reply(status=503, retry_after="0.2", error_message="queue full")] * 3,
        *[Reply(status=429, retry_after="0.2", error_message="slow down")] * 3,
        Reply(content="made it"),
    )
    run = start(strata, "helper", "busy?").json()
    assert (run["status"], run["output"]) == ("completed", "made it")
    events = httpx.get(f"{strata.url}/v1/runs/{run['id']}/events", headers=strata.headers, timeout=10).text
    assert events.count("event: run.waiting") == 2
    assert "queue full" in events


def test_fallback_model_takes_over(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="from the fallback"))
    run = start(strata, "resilient", "hello").json()
    assert (run["status"], run["output"]) == ("completed", "from the fallback")
    events = httpx.get(f"{strata.url}/v1/runs/{run['id']}/events", headers=strata.headers, timeout=10).text
    assert '"from":"mock-down","to":"mock-model"' in events


def test_events_resume_after_last_event_id(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(calc("2*2"), Reply(content="4"))
    run = start(strata, "helper", "2*2").json()
    with strata.client(timeout=10) as client:
        with connect_sse(client, "GET", f"{strata.url}/v1/runs/{run['id']}/events") as source:
            everything = [(int(e.id), e.event) for e in source.iter_sse()]
        with connect_sse(
            client, "GET", f"{strata.url}/v1/runs/{run['id']}/events", headers={"Last-Event-ID": "3"}
        ) as source:
            resumed = [(int(e.id), e.event) for e in source.iter_sse()]
    assert [seq for seq, _ in everything] == list(range(1, len(everything) + 1))
    assert resumed == everything[3:]


def test_websocket_chat_and_cancel(strata: StrataProcess, mock_backend: MockBackend) -> None:
    from websockets.sync.client import connect

    mock_backend.script(Reply(content="hello over ws"), Reply(content="never", latency_s=10))
    with connect(f"ws://127.0.0.1:{strata.port}/v1/agents/helper/ws", additional_headers=strata.headers) as socket:
        socket.send(json.dumps({"type": "message", "input": "hi"}))
        events = []
        while not events or events[-1]["type"] != "run.completed":
            events.append(json.loads(socket.recv(timeout=10)))
        assert events[-1]["output"] == "hello over ws"
        socket.send(json.dumps({"type": "message", "input": "now something slow"}))
        while (event := json.loads(socket.recv(timeout=10)))["type"] != "step.started":
            pass
        socket.send(json.dumps({"type": "cancel"}))
        while (event := json.loads(socket.recv(timeout=10)))["type"] not in ("run.cancelled", "run.completed"):
            pass
        assert event["type"] == "run.cancelled"
        socket.send("not json")
        assert json.loads(socket.recv(timeout=5))["type"] == "error"


def test_invalid_run_requests_are_400(strata: StrataProcess) -> None:
    bad = httpx.post(
        f"{strata.url}/v1/agents/helper/runs", json={"input": "x", "mode": "later"}, headers=strata.headers
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "mode"
    missing = httpx.post(f"{strata.url}/v1/agents/helper/runs", json={}, headers=strata.headers)
    assert (missing.status_code, missing.json()["error"]["param"]) == (400, "input")


def test_agents_are_listed_and_versioned_through_the_admin_api(strata: StrataProcess) -> None:
    names = [a["name"] for a in httpx.get(f"{strata.url}/v1/agents", headers=strata.headers).json()["data"]]
    assert "helper" in names and "approver" in names
    created = httpx.put(
        f"{strata.url}/admin/agents/poet",
        json={"model": "mock-model", "system_prompt": "Rhyme."},
        headers=strata.headers,
    )
    assert (created.status_code, created.json()["version"]) == (201, 1)
    updated = httpx.put(
        f"{strata.url}/admin/agents/poet",
        json={"model": "mock-model", "system_prompt": "Haiku."},
        headers=strata.headers,
    )
    assert (updated.status_code, updated.json()["version"]) == (200, 2)
    versions = httpx.get(f"{strata.url}/admin/agents/poet/versions", headers=strata.headers).json()["data"]
    assert [(v["version"], v["spec"]["system_prompt"]) for v in versions] == [(1, "Rhyme."), (2, "Haiku.")]
    bad_model = httpx.put(f"{strata.url}/admin/agents/poet", json={"model": "gpt-99"}, headers=strata.headers)
    assert (bad_model.status_code, bad_model.json()["error"]["param"]) == (400, "model")
    bad_tool = httpx.put(
        f"{strata.url}/admin/agents/poet", json={"model": "mock-model", "tools": ["nuke"]}, headers=strata.headers
    )
    assert (bad_tool.status_code, bad_tool.json()["error"]["param"]) == (400, "tools")


def test_strata_run_streams_to_the_terminal(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(calc("3*3"), Reply(content="Nine."))
    result = strata_cli(strata, "run", "helper", "3*3?")
    assert result.returncode == 0, result.stdout + result.stderr
    assert '-> calculator({"expression":"3*3"})' in result.stdout
    assert "<- 9" in result.stdout
    assert result.stdout.rstrip().endswith("Nine.")


def test_strata_run_shows_markup_and_control_characters_as_text(
    strata: StrataProcess, mock_backend: MockBackend
) -> None:
    """What models and tools write is text, never terminal markup, emoji codes or escape sequences."""
    label = "[/usr/share] [bold]loud[/bold] :thumbs_up:"
    answer = "Look in [/usr/share] for [bold]it[/bold] :smile:\x1b]0;owned\x07 done"
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("record", {"label": label})]), Reply(content=answer))
    result = strata_cli(strata, "run", "helper", "[/etc] [red]?")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"-> record({json.dumps({'label': label}, separators=(',', ':'))})" in result.stdout
    assert f"<- recorded {label}" in result.stdout
    assert "Look in [/usr/share] for [bold]it[/bold] :smile:\\x1b]0;owned\\x07 done" in result.stdout
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout


def test_strata_run_reports_a_failed_run(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(calc("1+1"), calc("2+2"), calc("3+3"))
    result = strata_cli(strata, "run", "short", "go")
    assert result.returncode == 1
    assert "run.failed: step limit" in result.stdout


def test_strata_chat_keeps_one_session(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="Hi Ada."), Reply(content="You are Ada."))
    result = strata_cli(strata, "chat", "helper", stdin="I am Ada\nWho am I?\n\n")
    assert result.returncode == 0, result.stderr
    assert "Hi Ada." in result.stdout and "You are Ada." in result.stdout
    contents = [m.get("content") for m in mock_backend.chat_requests()[-1].body["messages"]]
    assert contents[1:] == ["I am Ada", "Hi Ada.", "Who am I?"]


def test_after_its_tool_rounds_the_model_is_offered_no_tools(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(calc("2+2"), Reply(content="4, finally"))
    run = start(strata, "decisive", "2+2?").json()
    assert (run["status"], run["output"]) == ("completed", "4, finally")
    first, second = mock_backend.chat_requests()[-2:]
    assert [t["function"]["name"] for t in first.body["tools"]] == ["calculator"]
    assert "tools" not in second.body and "tool_choice" not in second.body
