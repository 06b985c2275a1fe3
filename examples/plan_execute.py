"""Plan and execute: the model writes a plan, a person approves (or edits) it, then each step is carried out."""

from __future__ import annotations

from strata.agents.durable import RunContext


def numbered_lines(text: str) -> list[str]:
    """The plan's steps: its non-empty lines, without their numbering."""
    return [line.lstrip("0123456789.)- ").strip() for line in text.splitlines() if line.strip()]


async def plan_and_execute(ctx: RunContext) -> str:
    task = ctx.input["content"]
    plan = await ctx.model(
        [
            {"role": "system", "content": "Write a short numbered plan, one step per line."},
            {"role": "user", "content": task},
        ]
    )
    steps = await ctx.step("parse plan", numbered_lines, plan.content)
    decision = await ctx.approval("execute plan", {"task": task, "steps": steps})  # the run waits here
    if not decision.approved:
        return f"Plan rejected: {decision.comment or 'no reason given'}"
    steps = (decision.data or {}).get("steps", steps)  # the approver may have edited the steps
    done = []
    for step in steps:
        result = await ctx.model(
            [
                {"role": "system", "content": f"Task: {task}. Carry out this step, briefly."},
                {"role": "user", "content": step},
            ]
        )
        done.append(f"- {step}: {result.content}")
    return "\n".join(done)
