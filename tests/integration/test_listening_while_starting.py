"""`strata serve` listens before its slow start-up work: the port accepts connections, /healthz answers 200,
/readyz and every other route answer 503 with Retry-After and say what is still loading; "listening" is
printed only once a connection succeeds, and "ready" once /readyz answers 200.

The start-up is held by an MCP server that accepts connections and answers nothing until the test lets go:
Strata's start waits for a tool server's first connection, so the test decides how long it is starting."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.mock_backend import MockBackend
from tests.support.strata_process import StrataProcess

LISTENING = "Strata listening on"
READY = "Strata ready"


class SilentServer:
    """Accepts TCP connections and never answers, until `release` closes them all (and stops listening)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed by release()
                return
            self.held.append(connection)

    def release(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()
        self.thread.join(timeout=5)


def held_by(silent: SilentServer, model_url: str) -> dict[str, Any]:
    """A config whose start waits for `silent`'s MCP connection (as long as the test holds it)."""
    mcp = {"name": "slow", "transport": "http", "url": f"http://127.0.0.1:{silent.port}/mcp", "timeout_s": 600}
    return {
        "models": [{"kind": "openai", "name": "m", "base_url": model_url}],
        "server": {"health_interval_s": 0.2},
        "tools": {"mcp_servers": [mcp]},
    }


def wait_for_line(process: StrataProcess, text: str, timeout_s: float = 60.0) -> None:
    assert process.stderr_path is not None and process.process is not None
    deadline = time.monotonic() + timeout_s
    while text not in process.stderr_path.read_text(errors="replace"):
        assert process.process.poll() is None, process.logs() + process.stderr_path.read_text()
        assert time.monotonic() < deadline, f"no {text!r} line:\n{process.stderr_path.read_text()}"
        time.sleep(0.01)


def test_listens_and_answers_503_while_starting_then_says_ready(tmp_path: Path) -> None:
    silent = SilentServer()
    with MockBackend() as mock:
        strata = StrataProcess(tmp_path, held_by(silent, mock.url), split_stderr=True).launch()
        try:
            wait_for_line(strata, LISTENING)
            # The line is printed only once the socket accepts: this connection must not be refused.
            assert httpx.get(strata.url + "/healthz", timeout=10).status_code == 200

            starting = httpx.get(strata.url + "/readyz", timeout=10)
            assert starting.status_code == 503 and starting.headers["Retry-After"] == "1"
            assert starting.json()["status"] == "starting"
            assert starting.json()["reason"].startswith("still starting: "), starting.json()
            refused = httpx.get(strata.base_url + "/models", headers=strata.headers, timeout=10)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "starting", refused.json()
            assert READY not in strata.stderr_path.read_text()

            silent.release()  # the tool server's connection fails; it is retried in the background
            strata.wait_for("/readyz", timeout_s=60)
            wait_for_line(strata, READY)
            assert httpx.get(strata.base_url + "/models", headers=strata.headers, timeout=10).status_code == 200
        finally:
            silent.release()
            assert strata.stop() == 0


def test_sigterm_while_starting_undoes_the_start_and_exits_cleanly(tmp_path: Path) -> None:
    """A start held by a tool server that never answers is cut short by SIGTERM, not waited out."""
    silent = SilentServer()
    strata = StrataProcess(tmp_path, held_by(silent, "http://127.0.0.1:9/v1"), split_stderr=True).launch()
    try:
        wait_for_line(strata, LISTENING)
        strata.wait_for("/readyz", 60, lambda r: "agent runtime" in r.json().get("reason", ""))  # held there
        assert strata.stop(timeout_s=60) == 0, strata.logs()
        assert "stopped while starting" in strata.logs(), strata.logs() + strata.stderr_path.read_text()
    finally:
        silent.release()
        strata.stop()
