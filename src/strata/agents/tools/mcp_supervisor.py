"""Keep each MCP server connected, as `serving.supervisor` keeps launched model servers running.

An `McpServerConnection` is one session: once its server dies it stays dead. The supervisor probes the
connection every `health_interval_s` (a call that finds the server gone ends it at once),
closes a lost one (a stdio server's process is reaped) and makes a new one: a new process for stdio, a
new session for HTTP. Attempts are spaced by the retry policy's full-jitter backoff, doubling up to
`restart_backoff_max_s`; each loss, failed attempt and return is logged. The tools it hands out are bound
to the supervisor, not to one connection, so they work again after a reconnect. A call made while the
server is away waits up to `reconnect_wait_s` (at most half its own timeout) for it, then fails saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from strata.agents.tools.base import Tool, ToolError, ToolResult
from strata.agents.tools.mcp_tools import McpConnectError, McpNotConnected, McpServerConnection, McpTool, describe
from strata.config import McpServerConfig, RetryConfig
from strata.resilience.retry import RetryBudget, RetryPolicy

log = structlog.get_logger("strata.tools.mcp")

BACKOFF_INITIAL_S = 0.5  # the first reconnect comes within this; later ones double up to restart_backoff_max_s
PROBE_MISSES = 3  # probes in a row without an answer before a (slow, but alive) server counts as lost


class McpServerState(enum.StrEnum):
    CONNECTING = "connecting"  # the first connection is being made
    READY = "ready"
    RECONNECTING = "reconnecting"  # lost, or never reached: attempts continue with backoff
    STOPPED = "stopped"


@dataclass(frozen=True)
class McpServerStatus:
    """One server as operators see it (`/readyz` details, `GET /admin/mcp-servers`)."""

    name: str
    transport: str
    state: McpServerState
    tools: list[str]
    restarts: int  # connections lost since start
    last_error: str | None
    since: float  # when it entered its state (epoch seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transport": self.transport,
            "state": self.state.value,
            "tools": self.tools,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "since": datetime.fromtimestamp(self.since, UTC).isoformat(),
        }


class McpSupervisor:
    def __init__(self, config: McpServerConfig, *, connect_timeout_s: float | None = None) -> None:
        self.config = config
        self.state = McpServerState.STOPPED
        self.restarts = 0
        self.last_error: str | None = None
        self.since = time.time()
        self._connect_timeout_s = connect_timeout_s
        self._connection: McpServerConnection | None = None  # the one in service (or being made)
        self._tools: dict[str, McpTool] = {}
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Only its backoff is used: reconnects are not retries of a request, so no budget applies.
        retry = RetryConfig(backoff_initial_s=BACKOFF_INITIAL_S, backoff_max_s=config.restart_backoff_max_s)
        self._backoff = RetryPolicy(retry, RetryBudget(ratio=0, window_s=1, min_per_s=0))

    @property
    def name(self) -> str:
        return self.config.name

    def tools(self) -> list[Tool]:
        """The server's tools as last listed (none before it was first reached), named `<server>__<tool>`."""
        return list(self._tools.values())

    def status(self) -> McpServerStatus:
        return McpServerStatus(self.name, self.config.transport, self.state, sorted(self._tools), self.restarts,
                               self.last_error, self.since)  # fmt: skip

    async def start(self) -> None:
        """Make the first connection (bounded by the connect timeout), then supervise it in the background.

        A server that cannot be reached now is logged and tried again in the background, with backoff."""
        if self._task is not None:
            raise RuntimeError(f"MCP server {self.name!r} is already supervised")
        self._set_state(McpServerState.CONNECTING)
        try:
            await self._connect()
        except McpConnectError as exc:
            self.last_error = str(exc)
            self._set_state(McpServerState.RECONNECTING)
            log.error("mcp server unavailable; retrying in the background", server=self.name, error=str(exc))
        self._task = asyncio.create_task(self._supervise(), name=f"mcp-supervise:{self.name}")

    def retry_now(self) -> None:
        """Cut the current backoff short (e.g. on a configuration reload): the next attempt starts at once."""
        self._retry_now.set()

    async def close(self) -> None:
        """Stop supervising and shut the server down. Idempotent."""
        self._stopping.set()
        self._ready.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        self._set_state(McpServerState.STOPPED)

    async def call(self, tool: str, arguments: dict[str, Any], timeout_s: float, idempotency_key: str) -> ToolResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        wait_s = min(self.config.reconnect_wait_s, timeout_s / 2)
        for _ in range(2):  # a second try only when the first was never sent
            connection = await self._connected(wait_s)
            try:
                return await connection.call(tool, arguments, max(0.0, deadline - loop.time()), idempotency_key)
            except McpNotConnected:
                continue  # lost between the check and the call: nothing reached the server
            except ToolError as exc:
                if connection.connected:
                    raise
                raise ToolError(f"{exc}; Strata is reconnecting to it, try again shortly") from None
        raise ToolError(self._unavailable(wait_s))

    # -- supervision ----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0  # reconnect attempts since the server was last ready
        while not self._stopping.is_set():
            connection = self._connection
            if connection is not None:
                reason = await self._watch(connection)
                if self._stopping.is_set():
                    return
                await self._lose(connection, reason)
                attempt = 0
            attempt += 1
            delay = self._backoff.delay(attempt)
            self._retry_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), delay)
            try:
                await self._connect()
            except Exception as exc:  # McpConnectError, or anything unforeseen: never end supervision
                self.last_error = str(exc) if isinstance(exc, McpConnectError) else describe(exc)
                log.warning("mcp server reconnect failed", server=self.name, error=self.last_error, attempt=attempt)
                continue
            log.info("mcp server reconnected", server=self.name, attempts=attempt, restarts=self.restarts)

    async def _connect(self) -> None:
        """One connection attempt; on success it is the one in service. Raises `McpConnectError`."""
        connection = McpServerConnection(self.config, connect_timeout_s=self._connect_timeout_s)
        self._connection = connection  # from now on: `close()` shuts it down, even half-made
        try:
            await connection.start()
        except BaseException:
            self._connection = None
            raise
        listed = {tool.name: tool for tool in connection.tools() if isinstance(tool, McpTool)}
        # Tools already handed out stay the same objects; a server that changed its tools gets the new list.
        self._tools = {name: self._tools.get(name) or McpTool(t.spec, t.mcp_name, self) for name, t in listed.items()}
        for name, tool in self._tools.items():
            tool.spec = listed[name].spec
        self._set_state(McpServerState.READY)
        self._ready.set()

    async def _watch(self, connection: McpServerConnection) -> str:
        """Return why the connection was lost (or "" once stopping): it ended, or probes fail."""
        misses = 0
        while not self._stopping.is_set():
            if await connection.wait_closed(self.config.health_interval_s):
                return connection.failure or "the connection closed"
            try:
                await connection.probe(min(self.config.timeout_s, self.config.health_interval_s * 2))
            except TimeoutError:
                misses += 1
                if misses >= PROBE_MISSES:
                    return f"no answer to {misses} probes in a row"
            except Exception as exc:
                return describe(exc)
            else:
                misses = 0
        return ""

    async def _lose(self, connection: McpServerConnection, reason: str) -> None:
        self._ready.clear()  # calls wait from now on
        self.restarts += 1
        self.last_error = reason
        self._set_state(McpServerState.RECONNECTING)
        log.warning("mcp server lost; reconnecting", server=self.name, transport=self.config.transport,
                    error=reason, restarts=self.restarts)  # fmt: skip
        await connection.close()  # a stdio server's process is reaped before the next one starts
        self._connection = None  # only now: `close()` must still find it if it comes first

    async def _connected(self, wait_s: float) -> McpServerConnection:
        connection = self._connection
        if connection is not None and self._ready.is_set():
            if connection.connected:
                return connection
            self._ready.clear()  # it ended a moment ago and the watcher has yet to see it: wait for the next one
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), wait_s)
        connection = self._connection
        if connection is None or not self._ready.is_set():
            raise ToolError(self._unavailable(wait_s))
        return connection

    def _unavailable(self, wait_s: float) -> str:
        why = f" ({self.last_error})" if self.last_error else ""
        return (
            f"MCP server {self.name!r} is {self.state.value}{why}; it did not come back within {wait_s:g}s, "
            "try again later"
        )

    def _set_state(self, state: McpServerState) -> None:
        if state is not self.state:
            self.state = state
            self.since = time.time()
