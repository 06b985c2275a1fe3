"""Fan-out: one child run per topic, all started together; the answers are merged once every child ended."""

from __future__ import annotations

from strata.agents.durable import RunContext


def topics_of(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()][:8]


async def research(ctx: RunContext) -> str:
    topics = await ctx.step("topics", topics_of, ctx.input["content"])
    results = await ctx.gather(*(ctx.child("researcher", f"Summarise in one line: {t}") for t in topics))
    answers = [r.output if r.status == "completed" else f"({r.status})" for r in results]
    return "\n".join(f"{topic}: {answer}" for topic, answer in zip(topics, answers, strict=True))
