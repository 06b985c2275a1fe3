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
    from strata.agents.tools.mcp_supervisor import McpSupervisor

log = structlog.get_logger("strata.tools")


class ToolUnavailable(LookupError):
    pass


class ToolRegistry:
    """Built-in and function tools are fixed at start; MCP servers' tools are those their supervisors
    know now (a server first reached after start-up brings its tools then)."""

    def __init__(self, tools: list[Tool], mcp: list[McpSupervisor] | None = None) -> None:
        self._tools = {tool.name: tool for tool in tools}
        self._mcp = mcp or []

    @property
    def mcp_servers(self) -> list[McpSupervisor]:
        return list(self._mcp)

    def reconnect_mcp_servers(self) -> None:
        """MCP servers that are down try again now instead of after their backoff."""
        for supervisor in self._mcp:
            supervisor.retry_now()

    def _all(self) -> dict[str, Tool]:
        if not self._mcp:
            return self._tools
        tools = dict(self._tools)
        for supervisor in self._mcp:
            tools.update((tool.name, tool) for tool in supervisor.tools())
        return tools

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
        supervisors: list[McpSupervisor] = []
        if config.mcp_servers:  # the MCP SDK is imported only when used: it is ~0.4 s of `strata serve` start-up
            from strata.agents.tools.mcp_supervisor import McpSupervisor
        for server in config.mcp_servers:
            # One broken server must not take the others (or Strata) down: one that cannot be reached now
            # is retried in the background, and runs of agents that need its tools fail with the reason.
            supervisor = McpSupervisor(server)
            await supervisor.start()
            supervisors.append(supervisor)
        return cls(tools, supervisors)

    def get(self, name: str) -> Tool | None:
        return self._all().get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._all())

    def for_agent(self, agent: AgentConfig) -> list[Tool]:
        tools = self._all()
        missing = [name for name in agent.tools if name not in tools]
        if missing:
            down = [
                f"MCP server {s.name!r} is {s.state.value}: {s.last_error}"
                for s in self._mcp
                if s.state.value != "ready" and any(name.startswith(f"{s.name}__") for name in missing)
            ]
            why = f" ({'; '.join(down)})" if down else ""
            raise ToolUnavailable(f"agent {agent.name!r} needs tools that are not available: {', '.join(missing)}{why}")
        return [tools[name] for name in agent.tools]

    async def close(self) -> None:
        for supervisor in self._mcp:
            await supervisor.close()
        for tool in self._tools.values():
            await tool.close()
