"""What a durable run context needs from the rest of Strata, as one narrow interface.

The engine gives a context the real ports (the dispatcher for models, the tool registry, the run store for
children and approvals); unit tests give it an in-memory fake. Each method is safe to call again
after a crash with the same `key`: a model call has no side effects, a tool receives the key as its
idempotency key, and a child run or an approval request is found by it rather than made twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol


class Suspended(Exception):
    """The run cannot go on now: it waits for an approval or a child run. Its worker releases it;
    the function is re-entered from the top when what it waits for arrives."""

    def __init__(self, reason: Literal["approval", "child"], waiting_for: list[dict[str, Any]]) -> None:
        super().__init__(f"waiting for {reason}")
        self.reason = reason
        self.waiting_for = waiting_for


@dataclass(frozen=True)
class ModelReply:
    """One model step's answer: the assistant message (content and tool calls) and what it used."""

    message: dict[str, Any]
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def content(self) -> str:
        return self.message.get("content") or ""

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return list(self.message.get("tool_calls") or [])

    def record(self) -> dict[str, Any]:
        return {
            "message": self.message, "model": self.model,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_usd,
        }  # fmt: skip


@dataclass(frozen=True)
class ToolOutput:
    content: str
    is_error: bool = False


@dataclass(frozen=True)
class ApprovalDecision:
    approved: bool
    comment: str | None = None
    data: dict[str, Any] | None = None  # what the approver edited, if anything


@dataclass(frozen=True)
class ChildResult:
    run_id: str
    status: str  # completed | failed | cancelled
    output: str | None = None


@dataclass(frozen=True)
class ModelRequest:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    model: str | None = None  # None: the agent's model (and its fallback)
    temperature: float | None = None
    max_tokens: int | None = None


class Ports(Protocol):
    async def model(self, request: ModelRequest, key: str) -> ModelReply: ...

    async def tool(self, name: str, arguments: dict[str, Any] | str, key: str) -> ToolOutput: ...

    async def refuse(self, name: str, message: str, key: str) -> ToolOutput:
        """A call an approver denied: recorded (and counted) as refused, never run."""
        ...

    async def approval(self, name: str, payload: dict[str, Any], key: str) -> ApprovalDecision | None:
        """The decision on this request, or None when undecided (the request is then shown to approvers)."""
        ...

    async def child(self, agent: str, input_: dict[str, Any], key: str) -> ChildResult | None:
        """Start (once per key) a run of `agent`; its result once it ended, else None (it is still going)."""
        ...
