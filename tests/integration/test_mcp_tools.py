"""MCP servers' tools as agent tools, against real server processes over stdio and streamable HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from strata.agents.tools.base import Tool, ToolContext, ToolError, ToolRisk
from strata.agents.tools.mcp_supervisor import McpServerState, McpSupervisor
from strata.agents.tools.mcp_tools import McpConnectError, McpServerConnection
from strata.agents.tools.registry import ToolRegistry, ToolUnavailable
from strata.config import AgentConfig, McpServerConfig
from tests.support.strata_process import free_port, start_listening

CALC = [sys.executable, "-m", "tests.support.mcp_servers.calc_server"]
CTX = ToolContext(run_id="run1", idempotency_key="run1:2:0", timeout_s=10.0)


def calc_config(tmp_path: Path, **overrides: Any) -> McpServerConfig:
    fields: dict[str, Any] = {
        "name": "calc",
        "transport": "stdio",
        "command": CALC[0],
        "args": CALC[1:],
        "env": {"CALC_RECORD_PATH": str(tmp_path / "record.txt")},
        **overrides,
    }
    return McpServerConfig(**fields)


def by_name(tools: list[Tool]) -> dict[str, Tool]:
    return {tool.name: tool for tool in tools}


def process_gone(pid: int) -> bool:
    """True once the process has exited and been reaped (a zombie still counts as present)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def server_pid(tools: dict[str, Tool]) -> int:
    result = await tools["calc__whoami"].invoke({}, CTX)
    return int(result.metadata["structured_content"]["pid"])


@pytest.fixture
async def calc(tmp_path: Path) -> AsyncIterator[McpServerConnection]:
    connection = McpServerConnection(calc_config(tmp_path, timeout_s=5, risk="high", requires_approval=True))
    await connection.start()
    yield connection
    await connection.close()


@pytest.fixture
def http_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    process, port = start_listening(
        lambda port: [sys.executable, "-m", "tests.support.mcp_servers.http_server", str(port)]
    )
    try:
        yield f"http://127.0.0.1:{port}/mcp", process
    finally:
        process.kill()
        process.wait()


async def test_stdio_tools_are_namespaced_and_keep_their_schemas(calc: McpServerConnection) -> None:
    tools = by_name(calc.tools())
    assert set(tools) == {"calc__add", "calc__divide", "calc__record", "calc__sleep", "calc__pixel", "calc__whoami"}
    add = tools["calc__add"].spec
    assert add.description == "Add two integers."
    assert add.parameters["required"] == ["a", "b"]
    assert {k: v["type"] for k, v in add.parameters["properties"].items()} == {"a": "integer", "b": "integer"}
    assert add.openai_schema()["function"]["name"] == "calc__add"
    assert (add.risk, add.requires_approval, add.timeout_s) == (ToolRisk.HIGH, True, 5.0)


async def test_invoking_returns_text_and_tool_errors_become_error_results(calc: McpServerConnection) -> None:
    tools = by_name(calc.tools())
    added = await tools["calc__add"].invoke({"a": 2, "b": 3}, CTX)
    assert (added.content, added.is_error) == ("5", False)
    failed = await tools["calc__divide"].invoke({"a": 1, "b": 0}, CTX)
    assert failed.is_error and "cannot divide by zero" in failed.content
    bad_arguments = await tools["calc__add"].invoke({"a": "two"}, CTX)
    assert bad_arguments.is_error
    pixel = await tools["calc__pixel"].invoke({}, CTX)
    assert pixel.content.splitlines() == ["a single pixel", "[image: image/png, 67 bytes]"]


async def test_side_effects_run_once_and_carry_the_idempotency_key(calc: McpServerConnection, tmp_path: Path) -> None:
    result = await by_name(calc.tools())["calc__record"].invoke({"note": "buy milk"}, CTX)
    assert not result.is_error
    assert (tmp_path / "record.txt").read_text() == "run1:2:0\tbuy milk\n"


async def test_server_sees_its_configured_env_but_not_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_TEST_SECRET", "do-not-leak")
    async with McpServerConnection(calc_config(tmp_path)) as connection:
        result = await by_name(connection.tools())["calc__whoami"].invoke({}, CTX)
    env = json.loads(result.content)["env"]
    assert env["CALC_RECORD_PATH"] == str(tmp_path / "record.txt")
    assert "PATH" in env
    assert "STRATA_TEST_SECRET" not in env


async def test_a_slow_call_times_out_and_the_server_stays_usable(calc: McpServerConnection) -> None:
    tools = by_name(calc.tools())
    with pytest.raises(ToolError, match=r"'sleep' on server 'calc' did not answer within 0.5s"):
        await tools["calc__sleep"].invoke({"seconds": 30}, ToolContext("run1", "run1:1:0", timeout_s=0.5))
    assert (await tools["calc__add"].invoke({"a": 1, "b": 1}, CTX)).content == "2"


async def test_a_killed_server_fails_calls_quickly(calc: McpServerConnection) -> None:
    tools = by_name(calc.tools())
    os.kill(await server_pid(tools), signal.SIGKILL)
    with pytest.raises(ToolError, match="MCP server 'calc' closed the connection"):
        await tools["calc__add"].invoke({"a": 1, "b": 1}, CTX)
    assert not calc.connected
    with pytest.raises(ToolError, match="'calc' is not connected"):
        await tools["calc__add"].invoke({"a": 1, "b": 1}, CTX)
    await calc.close()


async def test_close_stops_the_server_process_even_mid_call(calc: McpServerConnection) -> None:
    tools = by_name(calc.tools())
    pid = await server_pid(tools)
    in_flight = asyncio.create_task(tools["calc__sleep"].invoke({"seconds": 30}, CTX))
    await asyncio.sleep(0.2)
    await calc.close()
    assert process_gone(pid)
    with pytest.raises(ToolError):
        await in_flight
    with pytest.raises(ToolError, match="not connected"):
        await tools["calc__add"].invoke({"a": 1, "b": 1}, CTX)
    await calc.close()  # a second close is harmless


async def test_two_servers_never_collide(tmp_path: Path) -> None:
    first = McpServerConnection(calc_config(tmp_path, name="math"))
    second = McpServerConnection(calc_config(tmp_path, name="calc"))
    await first.start()
    try:
        await second.start()
        try:
            names_first, names_second = set(by_name(first.tools())), set(by_name(second.tools()))
            assert "math__add" in names_first and "calc__add" in names_second
            assert not names_first & names_second
            result = await by_name(first.tools())["math__add"].invoke({"a": 20, "b": 22}, CTX)
            assert result.content == "42"
        finally:
            await second.close()
    finally:
        await first.close()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"command": "/nonexistent/mcp-server", "args": []}, "FileNotFoundError"),
        ({"command": sys.executable, "args": ["-c", "pass"]}, "Connection closed"),
        ({"transport": "http", "url": f"http://127.0.0.1:{free_port()}/mcp", "command": None}, "ConnectError"),
    ],
    ids=["missing-command", "exits-at-once", "nothing-listening"],
)
async def test_a_server_that_cannot_start_is_reported(tmp_path: Path, overrides: dict[str, Any], reason: str) -> None:
    connection = McpServerConnection(calc_config(tmp_path, **overrides), connect_timeout_s=10)
    with pytest.raises(McpConnectError, match=f"MCP server 'calc' did not start: .*{reason}"):
        await connection.start()
    assert connection.tools() == [] and not connection.connected


async def test_http_server_tools_work_and_a_dead_server_fails_fast(
    http_server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, process = http_server
    connection = McpServerConnection(McpServerConfig(name="words", transport="http", url=url))
    await connection.start()
    try:
        tools = by_name(connection.tools())
        assert set(tools) == {"words__echo", "words__word_count"}
        assert tools["words__echo"].spec.parameters["properties"]["text"]["type"] == "string"
        assert tools["words__echo"].spec.risk is ToolRisk.MEDIUM
        assert (await tools["words__word_count"].invoke({"text": "one two three"}, CTX)).content == "3"
        assert (await tools["words__echo"].invoke({"text": "hello"}, CTX)).content == "hello"

        process.kill()
        process.wait()
        with pytest.raises(ToolError, match="MCP server 'words'"):
            await tools["words__echo"].invoke({"text": "anyone?"}, CTX)
    finally:
        await connection.close()
    assert not connection.connected


async def test_a_supervised_server_that_cannot_start_is_retried_and_its_tools_appear_when_it_does(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "calc-down"
    gate.touch()
    env = {"CALC_RECORD_PATH": str(tmp_path / "record.txt"), "CALC_DOWN_PATH": str(gate)}
    config = calc_config(tmp_path, env=env, health_interval_s=0.5, restart_backoff_max_s=0.5)
    supervisor = McpSupervisor(config, connect_timeout_s=10)
    await supervisor.start()
    try:
        assert supervisor.state is McpServerState.RECONNECTING and supervisor.tools() == []
        assert "did not start" in (supervisor.last_error or "")
        registry = ToolRegistry([], [supervisor])
        agent = AgentConfig(name="adder", model="m", tools=["calc__add"])
        with pytest.raises(ToolUnavailable, match=r"calc__add \(MCP server 'calc' is reconnecting: .*did not start"):
            registry.for_agent(agent)

        gate.unlink()
        deadline = time.monotonic() + 30
        while supervisor.state is not McpServerState.READY:
            assert time.monotonic() < deadline, "the server was not reconnected"
            await asyncio.sleep(0.05)
        [add] = registry.for_agent(agent)
        assert (await add.invoke({"a": 1, "b": 2}, CTX)).content == "3"
        assert supervisor.status().as_dict()["tools"][0] == "calc__add"
    finally:
        await supervisor.close()
    assert supervisor.state is McpServerState.STOPPED
