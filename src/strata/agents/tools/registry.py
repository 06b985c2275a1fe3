"""All tools this process offers: built-ins, configured Python functions, and MCP servers' tools."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from strata.agents.tools.base import Tool, ToolRisk
from strata.agents.tools.builtins import builtin_tools
from strata.agents.tools.functions import FunctionTool, load_function
from strata.agents.tools.http_fetch import HttpFetchTool
from strata.agents.tools.python_sandbox import PythonSandboxTool
from strata.agents.tools.read_document import ReadDocumentTool
from strata.compute.offload import CpuPool
from strata.config import AgentConfig, ToolsConfig

if TYPE_CHECKING:
    from strata.agents.tools.mcp_tools import McpServerConnection

log = structlog.get_logger("strata.tools")


class ToolUnavailable(LookupError):
    pass


class ToolRegistry:
    def __init__(self, tools: list[Tool], mcp: list[McpServerConnection] | None = None) -> None:
        self._tools = {tool.name: tool for tool in tools}
        self._mcp = mcp or []

    @classmethod
    async def from_config(cls, config: ToolsConfig, cpu: CpuPool) -> ToolRegistry:
        tools: list[Tool] = list(builtin_tools())
        if config.read_document.enabled:
            tools.append(ReadDocumentTool.from_config(config.read_document, cpu))
        if config.http_fetch.enabled:
            tools.append(HttpFetchTool(config.http_fetch))
        if config.python.enabled:
            python = PythonSandboxTool(config.python)
            if python.unavailable_reason:
                # Kept registered: a call gets the reason as its error, never unsandboxed execution.
                log.warning("python tool disabled", reason=python.unavailable_reason)
            tools.append(python)
        for function in config.functions:
            tools.append(
                FunctionTool(
                    load_function(function.import_path),
                    name=function.name,
                    description=function.description,
                    timeout_s=function.timeout_s,
                    risk=ToolRisk(function.risk),
                    requires_approval=function.requires_approval,
                )
            )
        connections: list[McpServerConnection] = []
        if config.mcp_servers:  # the MCP SDK is imported only when used: it is ~0.4 s of `strata serve` start-up
            from strata.agents.tools.mcp_tools import McpConnectError, McpServerConnection
        for server in config.mcp_servers:
            connection = McpServerConnection(server)
            try:
                await connection.start()
            except McpConnectError as exc:
                # One broken server must not take the others (or Strata) down; its tools are missing
                # and runs of agents that need them fail with that reason.
                log.error("MCP server unavailable; its tools are disabled", server=server.name, error=str(exc))
                continue
            connections.append(connection)
            tools.extend(connection.tools())
        return cls(tools, connections)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._tools)

    def for_agent(self, agent: AgentConfig) -> list[Tool]:
        missing = [name for name in agent.tools if name not in self._tools]
        if missing:
            raise ToolUnavailable(f"agent {agent.name!r} needs tools that are not available: {', '.join(missing)}")
        return [self._tools[name] for name in agent.tools]

    async def close(self) -> None:
        for connection in self._mcp:
            await connection.close()
        for tool in self._tools.values():
            await tool.close()
