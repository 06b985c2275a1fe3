"""Which deployment a model's pool picks: breakers, panic, and replicas that asked for a pause."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

from strata.config import RetryConfig
from strata.resilience.breaker import BreakerState
from strata.resilience.retry import RetryBudget, RetryPolicy
from strata.serving.pool import ModelPool


def deployment(name: str, state: BreakerState = BreakerState.CLOSED, paused_s: float = 0.0) -> Any:
    return SimpleNamespace(
        name=name,
        breaker=SimpleNamespace(state=state),
        healthy=True,
        weight=1.0,
        load=0.0,
        paused_until=time.monotonic() + paused_s,
    )


def pool(*deployments: Any, panic_threshold: float = 0.5, fallbacks: list[str] | None = None) -> ModelPool:
    budget = RetryBudget.from_config(RetryConfig())
    return ModelPool(
        "llm",
        list(deployments),
        retry=RetryPolicy(RetryConfig(), budget),
        budget=budget,
        fallbacks=fallbacks or [],
        total_timeout_s=60,
        panic_threshold=panic_threshold,
        rng=random.Random(7),
    )


def picks(p: ModelPool, **kwargs: Any) -> set[str]:
    return {d.name for d in (p.pick(**kwargs) for _ in range(200)) if d is not None}


def test_panic_when_fewer_than_the_threshold_have_a_closed_breaker() -> None:
    open_, closed = BreakerState.OPEN, BreakerState.CLOSED
    assert not pool(deployment("a", open_), deployment("b", closed)).panicking, "1 of 2 is not below half"
    assert pool(deployment("a", open_), deployment("b", BreakerState.HALF_OPEN)).panicking
    assert pool(deployment("a", open_), deployment("b", open_), deployment("c", closed)).panicking
    assert not pool(deployment("a", open_), deployment("b", closed), deployment("c", closed)).panicking
    assert pool(deployment("a", open_)).panicking, "a lone deployment is never shut out"
    assert not pool(deployment("a", open_), panic_threshold=0).panicking
    assert not pool(deployment("a", open_), fallbacks=["cpu"]).panicking, "a model with fallbacks fails over"


def test_open_breakers_are_skipped_unless_in_panic() -> None:
    p = pool(deployment("a", BreakerState.OPEN), deployment("b", BreakerState.OPEN), deployment("c"))
    assert picks(p) == {"c"}
    assert picks(p, panic=True) == {"a", "b", "c"}
    assert p.pick(exclude={"c"}) is None
    assert picks(p, exclude={"c"}, panic=True) == {"a", "b"}


def test_a_paused_deployment_is_picked_only_when_no_other_is_left() -> None:
    p = pool(deployment("a", paused_s=30), deployment("b"))
    assert picks(p) == {"b"}
    assert picks(p, exclude={"b"}) == {"a"}
    assert picks(pool(deployment("a", paused_s=-1), deployment("b"))) == {"a", "b"}, "the pause is over"
