"""An agent using MCP tools: one server launched over stdio by Strata, one reached over HTTP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import REPO_ROOT, StrataProcess, start_listening


def test_an_agent_calls_tools_of_stdio_and_http_mcp_servers(tmp_path: Path) -> None:
    http_server, port = start_listening(
        lambda port: [sys.executable, "-m", "tests.support.mcp_servers.http_server", str(port)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with MockBackend(api_key="mock-secret") as mock:
            mock.script(
                Reply(
                    tool_calls=[
                        ToolCallSpec("calc__add", {"a": 20, "b": 22}, id="c1"),
                        ToolCallSpec("text__word_count", {"text": "three little words"}, id="c2"),
                    ]
                ),
                Reply(content="42 and 3"),
            )
            config = {
                "models": [mock_model(mock)],
                "tools": {
                    "mcp_servers": [
                        {
                            "name": "calc",
                            "transport": "stdio",
                            "command": sys.executable,
                            "args": ["-m", "tests.support.mcp_servers.calc_server"],
                            "env": {"PYTHONPATH": str(REPO_ROOT)},
                        },
                        {"name": "text", "transport": "http", "url": f"http://127.0.0.1:{port}/mcp"},
                    ]
                },
                "agents": [{"name": "mcp-user", "model": "mock-model", "tools": ["calc__add", "text__word_count"]}],
            }
            strata = StrataProcess(tmp_path, config, env={"MOCK_API_KEY": "mock-secret"}).start()
            try:
                run = httpx.post(
                    f"{strata.url}/v1/agents/mcp-user/runs", json={"input": "go"}, headers=strata.headers, timeout=30
                ).json()
                assert (run["status"], run["output"]) == ("completed", "42 and 3"), run
                results = {s["call_id"]: s["output"]["content"] for s in run["steps"] if s["kind"] == "tool"}
                assert results == {"c1": "42", "c2": "3"}
                offered = {t["function"]["name"] for t in mock.chat_requests()[0].body["tools"]}
                assert offered == {"calc__add", "text__word_count"}
            finally:
                assert strata.stop() == 0
    finally:
        http_server.terminate()
        http_server.wait(10)
