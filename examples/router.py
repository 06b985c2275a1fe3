"""A router: one model call picks the specialist agent, which answers as a child run."""

from __future__ import annotations

from strata.agents.durable import RunContext

SPECIALISTS = ("billing", "tech")


async def route(ctx: RunContext) -> str:
    question = ctx.input["content"]
    choice = await ctx.model(
        [
            {
                "role": "system",
                "content": f"Answer with one word, the team for this question: {' or '.join(SPECIALISTS)}.",
            },
            {"role": "user", "content": question},
        ]
    )
    team = next((t for t in SPECIALISTS if t in choice.content.lower()), SPECIALISTS[-1])
    answer = await ctx.child(team, question)  # a run of agent `team`; this run waits for it to end
    if answer.status != "completed":
        return f"The {team} team could not answer ({answer.status})."
    return answer.output or ""
