"""MCP servers that die come back without restarting Strata, against a real `strata serve` with a real stdio
MCP server (launched by Strata) and a real streamable-HTTP one (launched by the test)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import REPO_ROOT, StrataProcess, free_port

CALC = "tests.support.mcp_servers.calc_server"
BOUND_S = 30.0  # every wait below gives up after this


def start_http_server(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.mcp_servers.http_server", str(port)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + BOUND_S
    while True:
        assert process.poll() is None, "the HTTP MCP server exited on start-up"
        try:
            httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=0.5)
            return process
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the HTTP MCP server did not listen in time"
            time.sleep(0.1)


class Http:
    """The HTTP MCP server, restartable on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = start_http_server(self.port)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def restart(self) -> None:
        self.process = start_http_server(self.port)


@pytest.fixture(scope="module")
def http_mcp() -> Iterator[Http]:
    server = Http()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """While this file exists, a (re)started calc server exits at once."""
    return tmp_path_factory.mktemp("gate") / "calc-down"


@pytest.fixture(scope="module")
def strata(
    mock_backend: MockBackend, http_mcp: Http, gate: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StrataProcess]:
    supervision = {"health_interval_s": 0.5, "restart_backoff_max_s": 1.0}
    config = {
        "models": [mock_model(mock_backend)],
        "tools": {
            "mcp_servers": [
                {
                    "name": "calc",
                    "transport": "stdio",
                    "command": sys.executable,
                    "args": ["-m", CALC],
                    "env": {"PYTHONPATH": str(REPO_ROOT), "CALC_DOWN_PATH": str(gate)},
                    "timeout_s": 60,
                    "reconnect_wait_s": 25,  # long enough to see the restarted server answer a waiting call
                    **supervision,
                },
                {
                    "name": "text",
                    "transport": "http",
                    "url": f"http://127.0.0.1:{http_mcp.port}/mcp",
                    "timeout_s": 10,
                    "reconnect_wait_s": 1,  # short: a call made while it is down fails fast
                    **supervision,
                },
            ]
        },
        "agents": [
            {"name": "adder", "model": "mock-model", "tools": ["calc__add"]},
            {"name": "counter", "model": "mock-model", "tools": ["text__word_count"]},
        ],
        "server": {"health_interval_s": 0.5, "drain_delay_s": 0, "shutdown_grace_s": 2},
    }
    process = StrataProcess(tmp_path_factory.mktemp("strata"), config, env={"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0


def mcp_states(strata: StrataProcess) -> dict[str, str]:
    response = httpx.get(f"{strata.url}/readyz", timeout=5)
    assert response.status_code == 200, response.text  # a tool server never takes the models out of rotation
    return dict(response.json()["mcp_servers"])


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {BOUND_S:g}s: {what}"
        time.sleep(0.05)


def admin_view(strata: StrataProcess, name: str) -> dict[str, Any]:
    data = httpx.get(f"{strata.url}/admin/mcp-servers", headers=strata.headers, timeout=5).json()["data"]
    return next(server for server in data if server["name"] == name)


def log_records(strata: StrataProcess, event: str, server: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in strata.logs().splitlines() if line.startswith("{")]
    return [r for r in lines if r.get("event") == event and r.get("server") == server]


def script_tool_call(mock: MockBackend, tool: str, arguments: dict[str, Any]) -> None:
    mock.script(Reply(tool_calls=[ToolCallSpec(tool, arguments, id="c1")]), Reply(content="done"))


def run_agent(strata: StrataProcess, agent: str) -> dict[str, Any]:
    response = httpx.post(
        f"{strata.url}/v1/agents/{agent}/runs", json={"input": "go"}, headers=strata.headers, timeout=BOUND_S * 2
    )
    run = response.json()
    assert run["status"] == "completed", run
    return next(step for step in run["steps"] if step["kind"] == "tool")


def test_a_killed_stdio_server_is_restarted_and_a_waiting_call_succeeds(
    strata: StrataProcess, mock_backend: MockBackend, gate: Path
) -> None:
    assert mcp_states(strata)["calc"] == "ready"
    script_tool_call(mock_backend, "calc__add", {"a": 20, "b": 22})
    assert run_agent(strata, "adder")["output"]["content"] == "42"
    [pid] = strata.children(CALC)

    gate.touch()  # the restarted server will exit at once until the gate is gone
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: mcp_states(strata)["calc"] == "reconnecting", "/readyz shows calc reconnecting")
    view = admin_view(strata, "calc")
    assert view["state"] == "reconnecting" and view["restarts"] == 1 and view["last_error"]
    assert "calc__add" in view["tools"]
    assert log_records(strata, "mcp server lost; reconnecting", "calc")
    wait_until(lambda: bool(log_records(strata, "mcp server reconnect failed", "calc")), "a failed restart is logged")

    async def call_while_down() -> dict[str, Any]:
        script_tool_call(mock_backend, "calc__add", {"a": 1, "b": 2})
        waiting = asyncio.create_task(asyncio.to_thread(run_agent, strata, "adder"))
        await asyncio.sleep(1.0)  # the run's tool call is now waiting for the server
        assert not waiting.done()
        await asyncio.to_thread(gate.unlink)
        return await waiting

    step = asyncio.run(call_while_down())
    assert step["status"] == "completed" and step["output"]["content"] == "3", step
    wait_until(lambda: mcp_states(strata)["calc"] == "ready", "/readyz shows calc ready again")
    [new_pid] = strata.children(CALC)
    assert new_pid != pid
    assert log_records(strata, "mcp server reconnected", "calc")
    script_tool_call(mock_backend, "calc__add", {"a": 2, "b": 2})
    assert run_agent(strata, "adder")["output"]["content"] == "4"


def test_a_dead_http_server_fails_calls_clearly_and_is_reconnected_when_back(
    strata: StrataProcess, mock_backend: MockBackend, http_mcp: Http
) -> None:
    assert mcp_states(strata)["text"] == "ready"
    script_tool_call(mock_backend, "text__word_count", {"text": "three little words"})
    assert run_agent(strata, "counter")["output"]["content"] == "3"

    http_mcp.kill()
    wait_until(lambda: mcp_states(strata)["text"] == "reconnecting", "/readyz shows text reconnecting")
    assert log_records(strata, "mcp server lost; reconnecting", "text")

    script_tool_call(mock_backend, "text__word_count", {"text": "anyone there"})
    started = time.monotonic()
    step = run_agent(strata, "counter")
    assert time.monotonic() - started < BOUND_S
    message = step["output"]["content"]
    assert "MCP server 'text' is reconnecting" in message and "did not come back within 1s" in message, step

    http_mcp.restart()
    wait_until(lambda: mcp_states(strata)["text"] == "ready", "/readyz shows text ready again")
    assert admin_view(strata, "text")["restarts"] == 1
    script_tool_call(mock_backend, "text__word_count", {"text": "back in business"})
    assert run_agent(strata, "counter")["output"]["content"] == "3"
