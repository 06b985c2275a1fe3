"""Tools of MCP servers as agent tools: one connection per configured server, one `Tool` per MCP tool.

The SDK's transports and session are anyio context managers that must be entered and exited in the
same task, and a transport failure cancels the task that hosts them. So each connection lives in
its own background task, which the engine's tasks never share: tools send requests to the session
from the caller's task, and `close()` asks the host task to unwind, which closes the server's stdin
and, if it lingers, kills its process group (the SDK's bounded shutdown).

A connection is one session: once lost it stays lost. `mcp_supervisor.McpSupervisor` keeps a server
connected by replacing lost connections, and hands out tools bound to itself rather than to one connection.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Protocol

import anyio
import orjson
import structlog
from mcp import Client, MCPError, StdioServerParameters
from mcp import types as mcp_types
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from strata.agents.tools.base import Tool, ToolContext, ToolError, ToolResult, ToolRisk, ToolSpec
from strata.config import McpServerConfig
from strata.observability.tracing import inject

log = structlog.get_logger("strata.tools.mcp")

IDEMPOTENCY_META_KEY = "strata/idempotency-key"  # sent in each call's `_meta`, for servers that dedupe
_CLOSE_GRACE_S = 10.0  # the SDK's stdio shutdown (stdin close, SIGTERM, SIGKILL) is bounded at ~6.5 s
_FORCE_CLOSE_S = 3.0
_TIMEOUT_GRACE_S = 1.0  # backstop over the SDK's own read timeout, for a write that never completes
_MAX_LIST_PAGES = 100
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI-style function names allow


class McpConnectError(Exception):
    """The server could not be started, reached or initialised; its tools are unavailable."""


class McpNotConnected(ToolError):
    """The call was not sent: the connection was already lost (or not yet made)."""


class McpCaller(Protocol):
    """What an `McpTool` calls through: one connection, or a supervisor that outlives connections."""

    config: McpServerConfig

    async def call(
        self, tool: str, arguments: dict[str, Any], timeout_s: float, idempotency_key: str
    ) -> ToolResult: ...


class McpServerConnection:
    """One MCP server's session, hosted by a background task from `start()` to `close()`."""

    def __init__(self, config: McpServerConfig, *, connect_timeout_s: float | None = None) -> None:
        self.config = config
        self._connect_timeout_s = connect_timeout_s if connect_timeout_s is not None else config.timeout_s
        self._client: Client | None = None
        self._tools: list[McpTool] = []
        self._task: asyncio.Task[None] | None = None
        self._scope: anyio.CancelScope | None = None
        self._ready: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._failure: BaseException | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def connected(self) -> bool:
        """False before `start()`, after `close()`, and once the transport has failed."""
        return self._client is not None

    @property
    def failure(self) -> str | None:
        """Why the connection failed or was lost, if it was."""
        return describe(self._failure) if self._failure is not None else None

    async def wait_closed(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the connection to end (lost or closed); True if it has."""
        task = self._task
        if task is None or task.done():
            return True
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        return bool(done)

    async def probe(self, timeout_s: float) -> None:
        """Is the server still there? Raises (`TimeoutError` after `timeout_s`, or the transport's error) if not.

        It asks for the tool list's first page: `ping` is gone from newer protocol versions. Any answer counts,
        an MCP error too: the server is there to give it."""
        client = self._client
        if client is None:
            raise ConnectionError(self.failure or "not connected")
        try:
            with anyio.fail_after(timeout_s):
                await client.list_tools()
        except MCPError as exc:
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                raise TimeoutError(exc.message) from None
            if exc.code == mcp_types.CONNECTION_CLOSED:
                self._lost()
                raise

    async def start(self) -> None:
        """Connect, initialise and list the tools. Raises `McpConnectError` (and cleans up) on failure."""
        if self._task is not None:
            raise RuntimeError(f"MCP server {self.name!r} was already started")
        self._scope, self._ready, self._stop = anyio.CancelScope(), anyio.Event(), anyio.Event()
        self._task = asyncio.create_task(self._host(self._scope, self._ready, self._stop), name=f"mcp:{self.name}")
        try:
            with anyio.move_on_after(self._connect_timeout_s):
                await self._ready.wait()
        finally:
            if self._client is None:
                await self.close()
        if self._client is None:
            self._tools = []
            reason = describe(self._failure) if self._failure else f"no answer within {self._connect_timeout_s:g}s"
            raise McpConnectError(f"MCP server {self.name!r} did not start: {reason}")
        log.info("mcp server connected", server=self.name, tools=[tool.name for tool in self._tools])

    async def __aenter__(self) -> McpServerConnection:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def tools(self) -> list[Tool]:
        """The server's tools as listed at start-up, named `<server>__<tool>`."""
        return list(self._tools)

    async def call(self, tool: str, arguments: dict[str, Any], timeout_s: float, idempotency_key: str) -> ToolResult:
        """Call MCP tool `tool` (its name on the server). Raises `ToolError` on timeout or a lost server."""
        client = self._client
        if client is None:
            why = f" ({describe(self._failure)})" if self._failure else ""
            raise McpNotConnected(f"MCP server {self.name!r} is not connected{why}")
        meta: mcp_types.RequestParamsMeta = {IDEMPOTENCY_META_KEY: idempotency_key}
        inject(meta)  # type: ignore[arg-type]  # W3C trace context in `_meta` (MCP SEP-414): the tool call's span
        try:
            with anyio.fail_after(timeout_s + _TIMEOUT_GRACE_S):
                result = await client.call_tool(tool, arguments, read_timeout_seconds=timeout_s, meta=meta)
        except TimeoutError:
            raise ToolError(self._timed_out(tool, timeout_s)) from None
        except MCPError as exc:
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                raise ToolError(self._timed_out(tool, timeout_s)) from None
            if exc.code == mcp_types.CONNECTION_CLOSED:
                self._lost()
                raise ToolError(f"MCP server {self.name!r} closed the connection") from None
            raise ToolError(f"MCP server {self.name!r} rejected the call to {tool!r}: {exc.message}") from None
        except Exception as exc:  # a malformed result or a transport fault: the model sees it, the log keeps it
            log.warning("mcp call failed", server=self.name, tool=tool, error=describe(exc))
            raise ToolError(f"MCP tool {tool!r} on server {self.name!r} failed: {describe(exc)}") from None
        return _to_result(result)

    async def close(self) -> None:
        """Shut the session and the server down. Idempotent; bounded even when the server hangs."""
        task, self._client = self._task, None
        if task is None or task.done():
            return
        assert self._scope is not None and self._ready is not None and self._stop is not None
        self._stop.set()
        if not self._ready.is_set():  # still connecting: nothing to unwind gracefully
            self._scope.cancel()
        _, pending = await asyncio.wait({task}, timeout=_CLOSE_GRACE_S)
        if pending:
            self._scope.cancel()
            _, pending = await asyncio.wait({task}, timeout=_FORCE_CLOSE_S)
        if pending:
            task.cancel()
            log.warning("mcp server did not shut down in time", server=self.name)

    async def _host(self, scope: anyio.CancelScope, ready: anyio.Event, stop: anyio.Event) -> None:
        """The connection's whole life, in one task: connect, serve until asked to stop, disconnect."""
        try:
            with scope:
                async with self._client_for_transport() as client:
                    self._tools = _adapt_tools(self, await _list_tools(client))
                    self._client = client
                    ready.set()
                    await stop.wait()
        except Exception as exc:
            self._failure = exc
            if ready.is_set():
                log.warning("mcp server connection lost", server=self.name, error=describe(exc))
        finally:
            self._client = None
            ready.set()

    def _lost(self) -> None:
        """A closed session never reopens: stop routing calls to it and let the host task reap the server."""
        self._client = None
        self._failure = self._failure or ConnectionError("the server closed the connection")
        if self._stop is not None:
            self._stop.set()

    def _client_for_transport(self) -> Client:
        config = self.config
        if config.transport == "stdio":
            assert config.command is not None  # the config validator guarantees it
            # `env` is merged over the SDK's minimal environment (PATH, HOME, ...), never over ours.
            params = StdioServerParameters(command=config.command, args=config.args, env=config.env)
            return Client(stdio_client(params), cache=None)
        assert config.url is not None
        return Client(streamable_http_client(config.url), cache=None)

    def _timed_out(self, tool: str, timeout_s: float) -> str:
        return f"MCP tool {tool!r} on server {self.name!r} did not answer within {timeout_s:g}s"


class McpTool(Tool):
    """One MCP tool. The connection (or supervisor) owns the server, so closing a tool releases nothing."""

    kind = "extension"

    def __init__(self, spec: ToolSpec, mcp_name: str, caller: McpCaller) -> None:
        self.spec = spec
        self.mcp_name = mcp_name
        self._caller = caller

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        timeout_s = min(context.timeout_s, self.spec.timeout_s)
        return await self._caller.call(self.mcp_name, arguments, timeout_s, context.idempotency_key)


async def _list_tools(client: Client) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _adapt_tools(connection: McpCaller, listed: list[mcp_types.Tool]) -> list[McpTool]:
    """Namespace each tool as `<server>__<tool>`; characters models reject become `_`."""
    config = connection.config
    adapted: dict[str, McpTool] = {}
    for tool in listed:
        name = f"{config.name}__{re.sub(r'[^A-Za-z0-9_-]', '_', tool.name)}"
        if not _NAME.match(name) or name in adapted:
            log.warning("mcp tool skipped: name too long or not unique", server=config.name, tool=tool.name)
            continue
        spec = ToolSpec(
            name=name,
            description=tool.description or tool.title or "",
            parameters=dict(tool.input_schema),
            timeout_s=config.timeout_s,
            risk=ToolRisk(config.risk),
            requires_approval=config.requires_approval,
        )
        adapted[name] = McpTool(spec, tool.name, connection)
    return list(adapted.values())


def _to_result(result: mcp_types.CallToolResult) -> ToolResult:
    """Text blocks verbatim; other blocks as a one-line summary the model can reason about."""
    parts = [_render(block) for block in result.content]
    structured = result.structured_content
    if not parts and structured is not None:
        parts.append(orjson.dumps(structured).decode())
    metadata = {"structured_content": structured} if structured is not None else {}
    return ToolResult(content="\n".join(parts), is_error=bool(result.is_error), metadata=metadata)


def _render(block: mcp_types.ContentBlock) -> str:
    match block:
        case mcp_types.TextContent():
            return block.text
        case mcp_types.ImageContent() | mcp_types.AudioContent():
            return f"[{block.type}: {block.mime_type}, {_decoded_size(block.data)} bytes]"
        case mcp_types.ResourceLink():
            return f"[resource link: {block.uri}" + (f" ({block.name})]" if block.name else "]")
        case mcp_types.EmbeddedResource(resource=mcp_types.TextResourceContents() as contents):
            return contents.text
        case mcp_types.EmbeddedResource(resource=mcp_types.BlobResourceContents() as contents):
            return f"[resource: {contents.uri}, {contents.mime_type or 'binary'}, {_decoded_size(contents.blob)} bytes]"
    return f"[{getattr(block, 'type', 'unknown')} content]"


def _decoded_size(base64_data: str) -> int:
    return len(base64_data) * 3 // 4 - base64_data[-2:].count("=")


def describe(exc: BaseException) -> str:
    """The innermost errors of an exception group, as `Type: message`."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    if isinstance(exc, MCPError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
