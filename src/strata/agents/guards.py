"""Guards evaluated by the run loop.

Loop detection: an agent calling the same tool with the same arguments again and again, or bouncing
between two calls (A-B-A-B), is stuck; the run ends with the reason rather than burning its step budget.
Model scope: a run calls only the models its API key may use, its fallback included."""

from __future__ import annotations

from collections import Counter

import orjson

from strata.config import AgentConfig
from strata.store.tables import Run


class GuardTripped(Exception):
    """A guard ended the run (a limit, a loop, a model the run may not use); the message is the run's reason."""


def call_signature(name: str, arguments: str) -> str:
    try:
        canonical = orjson.dumps(orjson.loads(arguments or "{}"), option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONDecodeError:
        canonical = arguments
    return f"{name}({canonical})"


def detect_loop(previous: list[str], upcoming: list[str], repeats: int) -> str | None:
    """`previous` and `upcoming` are call signatures in order; returns the reason if a loop forms."""
    calls = previous + upcoming
    for signature, count in Counter(calls).items():
        if count >= repeats and signature in upcoming:
            return f"loop detected: {signature} called {count} times with the same arguments"
    if len(calls) >= 4:
        a, b, c, d = calls[-4:]
        if a == c and b == d and a != b:
            return f"loop detected: alternating between {a} and {b}"
    return None


def permitted_models(spec: AgentConfig, allowed: list[str] | None) -> tuple[list[str], list[str]]:
    """The agent's models in the order a step tries them, split into those the run's key may use and those it
    may not (`allowed` None: any model)."""
    models = [spec.model] + ([spec.fallback_model] if spec.fallback_model else [])
    if allowed is None:
        return models, []
    return [m for m in models if m in allowed], [m for m in models if m not in allowed]


def limit_reached(spec: AgentConfig, run: Run) -> str | None:
    """Why the run may not make another model step (steps, tokens, cost), or None."""
    limits = spec.limits
    if run.steps_taken >= limits.max_steps:
        return f"step limit: {limits.max_steps} model steps without a final answer"
    if run.prompt_tokens + run.completion_tokens >= limits.max_tokens:
        return f"token limit: {run.prompt_tokens + run.completion_tokens} >= {limits.max_tokens}"
    if limits.max_cost_usd is not None and run.cost_usd >= limits.max_cost_usd:
        return f"cost limit: ${run.cost_usd:.4f} >= ${limits.max_cost_usd:g}"
    return None
