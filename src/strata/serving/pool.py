"""The replicas of one model, and which one gets the next request.

Least outstanding requests by the power of two choices (weighted): two healthy deployments with a
closed breaker are drawn at random, in proportion to their weights, and the less loaded one wins.
Cheap, and it avoids the herd that "always the least loaded" causes when many requests arrive at once.

Panic (Envoy's panic threshold): when fewer than `panic_threshold` of the deployments have a closed
breaker, the breakers no longer pick: every deployment takes requests again. Breakers exist to move
traffic to the replicas that work; when too few work, shutting the rest out too would turn a partial
failure into a total one (and drown the last healthy replica). A model with fallbacks never panics:
it fails over to them instead.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection
from dataclasses import dataclass

import structlog

from strata.resilience.breaker import BreakerState
from strata.resilience.retry import RetryBudget, RetryPolicy
from strata.serving.deployment import Deployment
from strata.serving.faults import FaultClassifier

log = structlog.get_logger("strata.pool")


@dataclass
class PoolStats:
    """Counters of what resilience did for this model, read by the metrics collector at scrape time."""

    retries: int = 0
    fallbacks: int = 0  # requests this model could not serve that went on to a fallback model
    overloaded: int = 0  # requests refused because every deployment was at capacity
    circuit_open: int = 0  # requests refused because every breaker was open
    panic: int = 0  # attempts sent to a deployment whose breaker refused, because the model was in panic


class ModelPool:
    def __init__(
        self,
        model: str,
        deployments: list[Deployment],
        *,
        retry: RetryPolicy,
        budget: RetryBudget,
        fallbacks: list[str],
        total_timeout_s: float,
        config: object = None,
        panic_threshold: float = 0.0,
        faults: FaultClassifier | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.model = model
        self.config = config  # the model config this pool was built from (hot swap compares versions by it)
        self.version = 1
        self.deployments = deployments
        self.retry = retry
        self.budget = budget
        self.fallbacks = fallbacks
        self.total_timeout_s = total_timeout_s
        self.panic_threshold = panic_threshold
        self.faults = faults or FaultClassifier()
        self.stats = PoolStats()
        self._rng = rng or random.Random()
        self._panicking = False

    @property
    def panicking(self) -> bool:
        """Too few deployments have a closed breaker, and no fallback can take over: the breakers do not
        choose now (no I/O)."""
        closed = sum(1 for d in self.deployments if d.breaker.state is BreakerState.CLOSED)
        panicking = not self.fallbacks and closed < self.panic_threshold * len(self.deployments)
        if panicking != self._panicking:
            self._panicking = panicking
            if panicking:
                log.warning("model in panic: too few closed breakers, every deployment takes requests again",
                            model=self.model, closed=closed, deployments=len(self.deployments))  # fmt: skip
            else:
                log.info("model out of panic", model=self.model, closed=closed, deployments=len(self.deployments))
        return panicking

    def pick(self, exclude: Collection[str] = (), *, panic: bool = False) -> Deployment | None:
        """A deployment to try next, not among `exclude` (names already tried for this request).

        `panic`: the model is in panic, so deployments whose breaker is open are candidates too."""
        fresh = [
            d for d in self.deployments if d.name not in exclude and (panic or d.breaker.state is not BreakerState.OPEN)
        ]
        # Health probes lag: with nothing known-healthy, an untried replica is still worth a try.
        usable = [d for d in fresh if d.healthy] or fresh
        # A deployment that asked for a pause (Retry-After) only when no other is left.
        now = time.monotonic()
        usable = [d for d in usable if d.paused_until <= now] or usable
        if not usable:
            return None
        if len(usable) == 1:
            return usable[0]
        # Two candidates drawn in proportion to their weights; the less loaded one wins, ties the first.
        first, second = self._rng.choices(usable, weights=[d.weight for d in usable], k=2)
        return first if first.load <= second.load else second
