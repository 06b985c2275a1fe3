"""What every tool is, whatever runs it: a name, a JSON Schema for its arguments, limits, a risk level.

The engine only ever sees this interface; built-ins, Python functions and MCP tools all adapt to it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class ToolRisk(enum.StrEnum):
    LOW = "low"  # reads only, no side effects (a clock, a calculator)
    MEDIUM = "medium"  # reaches outside Strata or runs code, contained (http_fetch, sandboxed python)
    HIGH = "high"  # changes the world (sends mail, writes data); usually requires approval


@dataclass(frozen=True)
class ToolContext:
    """Passed to every invocation. `idempotency_key` is `run:step:call`: the same call on a resumed
    run gets the same key, so a tool with side effects can refuse to do them twice."""

    run_id: str
    idempotency_key: str
    timeout_s: float


@dataclass(frozen=True)
class ToolResult:
    """`content` is what the model sees. `is_error` marks a failure the model should know about."""

    content: str
    is_error: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


class ToolError(Exception):
    """A failure to report to the model as an error result (a refused URL, a timeout, bad arguments)."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    timeout_s: float = 30.0
    risk: ToolRisk = ToolRisk.LOW
    requires_approval: bool = False

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class Tool(ABC):
    spec: ToolSpec
    # OpenTelemetry's `gen_ai.tool.type`: "function" runs here, "extension" runs elsewhere (an MCP server).
    kind: str = "function"

    @property
    def name(self) -> str:
        return self.spec.name

    @abstractmethod
    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        """Run the tool. Raise `ToolError` for failures the model should see; the caller enforces
        `spec.timeout_s` and turns a timeout into an error result."""

    async def close(self) -> None:
        """Release what the tool holds (connections, subprocesses)."""
        return None
