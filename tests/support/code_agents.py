"""Code agents for integration tests, referenced by `entrypoint` from test configs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from strata.agents.durable import RunContext


def die_at(boundary: int) -> None:
    """kill -9 this server the first time any execution reaches `boundary` (a marker file remembers it)."""
    folder = os.environ.get("TEST_KILL_DIR")
    if not folder:
        return
    marker = Path(folder) / f"boundary-{boundary}"
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def plan(text: str) -> list[str]:
    with Path(os.environ["TEST_SIDE_EFFECTS_LOG"]).open("a") as handle:
        handle.write(f"step plan {text}\n")
    return [f"{text}-a", f"{text}-b"]


async def clerk(ctx: RunContext) -> str:
    """A model step, a step of code, two tool calls, a model step: a boundary after each (and before all)."""
    die_at(0)
    first = await ctx.model([{"role": "user", "content": ctx.input["content"]}])
    die_at(1)
    labels = await ctx.step("plan", plan, first.content)
    die_at(2)
    for index, label in enumerate(labels):
        await ctx.tool("record", {"label": label})
        die_at(3 + index)
    final = await ctx.model([{"role": "user", "content": ctx.input["content"]}, first.message])
    die_at(5)
    return final.content


def read_label() -> str:
    return Path(os.environ["TEST_WANDER_FILE"]).read_text()


async def wanders(ctx: RunContext) -> str:
    """Calls a tool with what a file says *now*: not deterministic, as its re-entry after an approval shows."""
    label = read_label()
    await ctx.tool("record", {"label": label})
    await ctx.approval("go on")
    return "done"


async def broken(ctx: RunContext) -> str:
    """A function with a bug of its own after one step."""
    await ctx.step("count", len, "abc")
    raise RuntimeError("the agent's own bug")
