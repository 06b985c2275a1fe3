"""The agent-step scenario's loop written as code (agents as code): model, then its tool calls, until it answers.

Strata imports it by `entrypoint: bench.code_agent:tool_loop` (bench/servers.py); the scenario drives it through
the same API as the built-in agent, so the two rows compare the engines' cost per step, not the loops.
"""

from __future__ import annotations

from typing import Any

import orjson

from strata.agents.durable import RunContext


async def tool_loop(ctx: RunContext) -> str:
    messages: list[dict[str, Any]] = [ctx.input]
    while True:
        reply = await ctx.model(messages, tools=ctx.tools)
        messages.append(reply.message)
        calls = reply.tool_calls
        if not calls:
            return reply.content
        results = await ctx.gather(
            *(ctx.tool(call["function"]["name"], orjson.loads(call["function"]["arguments"] or "{}")) for call in calls)
        )
        for call, result in zip(calls, results, strict=True):
            content = f"Error: {result.content}" if result.is_error else result.content
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
