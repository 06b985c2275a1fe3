"""The replicas of one model, and which one gets the next request.

Least outstanding requests by the power of two choices (weighted): two healthy deployments with a
closed breaker are drawn at random, in proportion to their weights, and the less loaded one wins.
Cheap, and it avoids the herd that "always the least loaded" causes when many requests arrive at once.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass

from strata.resilience.breaker import BreakerState
from strata.resilience.retry import RetryBudget, RetryPolicy
from strata.serving.deployment import Deployment


@dataclass
class PoolStats:
    """Counters of what resilience did for this model, read by the metrics collector at scrape time."""

    retries: int = 0
    fallbacks: int = 0  # requests this model could not serve that went on to a fallback model
    overloaded: int = 0  # requests refused because every deployment was at capacity
    circuit_open: int = 0  # requests refused because every breaker was open


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
        self.stats = PoolStats()
        self._rng = rng or random.Random()

    def pick(self, exclude: Collection[str] = ()) -> Deployment | None:
        """A deployment to try next, not among `exclude` (names already tried for this request)."""
        fresh = [d for d in self.deployments if d.name not in exclude and d.breaker.state is not BreakerState.OPEN]
        usable = [d for d in fresh if d.healthy]
        if not usable:
            # Health probes lag: with nothing known-healthy, an untried replica is still worth a try.
            usable = fresh
        if not usable:
            return None
        if len(usable) == 1:
            return usable[0]
        # Two candidates drawn in proportion to their weights; the less loaded one wins, ties the first.
        first, second = self._rng.choices(usable, weights=[d.weight for d in usable], k=2)
        return first if first.load <= second.load else second
