"""The built-in tool-calling agent: a model, a prompt and tools in a ReAct loop, written as an agent function over
the same run context as a code agent (`ctx.model`, `ctx.tool`, `ctx.gather`), so one engine drives both.

Each model step is journaled at its turn and each tool call at `turn` and its call id, so its idempotency key is
`run:turn:call_id` and the runs API shows the steps as it always has. A run resumed after a crash or an approval
re-enters the function from the top: completed steps return their recorded results, so no completed tool call
runs again. The run's conversation is rebuilt from those results, on top of the session's earlier messages.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import orjson

from strata.agents.approvals import pending_entry
from strata.agents.durable.context import RunContext
from strata.agents.durable.ports import Suspended, ToolOutput
from strata.agents.guards import GuardTripped, call_signature, detect_loop
from strata.config import AgentConfig

Decision = Callable[[int, dict[str, Any]], dict[str, Any] | None]


def tool_message(call_id: str, output: ToolOutput) -> dict[str, Any]:
    """A tool call's result as the model (and the session) sees it."""
    content = f"Error: {output.content}" if output.is_error else output.content
    return {"role": "tool", "tool_call_id": call_id, "content": content}


class ToolAgent:
    """One run's built-in agent. `earlier` is the session's conversation before this run, its input included;
    `decision(turn, call)` is an approver's decision on that call, if any."""

    def __init__(
        self,
        spec: AgentConfig,
        tools: list[dict[str, Any]],
        earlier: list[dict[str, Any]],
        needs_approval: Callable[[str], bool],
        decision: Decision,
    ) -> None:
        self.spec = spec
        self.tools = tools
        self.tool_names = sorted(t["function"]["name"] for t in tools)
        self.earlier = earlier
        self.needs_approval = needs_approval
        self.decision = decision

    async def __call__(self, ctx: RunContext) -> str:
        spec, limits = self.spec, self.spec.limits
        messages = list(self.earlier)
        signatures: list[str] = []  # this run's tool calls so far, for loop detection
        rounds = 0
        for turn in itertools.count():  # until an answer, or a guard ends the run (limits: before each model step)
            sent = [{"role": "system", "content": spec.system_prompt}, *messages] if spec.system_prompt else messages
            offered = limits.tool_rounds is None or rounds < limits.tool_rounds
            reply = await ctx.model(
                sent, tools=self.tools if offered else [], turn=turn,
                shown={"messages": len(sent), "tools": self.tool_names},
            )  # fmt: skip
            messages.append(reply.message)
            calls = reply.tool_calls
            if not calls:
                return reply.content
            rounds += 1  # noqa: SIM113 (a round is a model step that called tools, not every turn)
            waiting = [
                pending_entry(ctx.run_id, turn, c)
                for c in calls
                if self.needs_approval(c["function"]["name"]) and self.decision(turn, c) is None
            ]
            if waiting:
                raise Suspended("approval", waiting)
            upcoming = [call_signature(c["function"]["name"], c["function"]["arguments"]) for c in calls]
            loop = detect_loop(signatures, upcoming, limits.loop_repeats)
            if loop:
                raise GuardTripped(loop)
            signatures += upcoming
            if len(calls) == 1:  # the common case: no task to make and schedule
                outputs = [await self._call(ctx, turn, calls[0])]
            else:
                outputs = await ctx.gather(*(self._call(ctx, turn, c) for c in calls))
            messages.extend(tool_message(c["id"], o) for c, o in zip(calls, outputs, strict=True))
        raise AssertionError("unreachable")

    def _call(self, ctx: RunContext, turn: int, call: dict[str, Any]) -> Any:
        function = call["function"]
        arguments = function["arguments"]
        decision = self.decision(turn, call)  # this very call's, if an approver decided on it
        refusal = None
        if decision is not None:
            if decision.get("arguments") is not None:
                arguments = orjson.dumps(decision["arguments"]).decode()
            if decision.get("decision") == "deny":
                comment = decision.get("comment")
                refusal = "The call was denied by an approver." + (f" {comment}" if comment else "")
        return ctx.tool(function["name"], arguments or "", turn=turn, call_id=call["id"], refusal=refusal)
