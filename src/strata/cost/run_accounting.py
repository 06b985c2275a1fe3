"""What an agent run's steps cost, and where that goes: a usage row per model step, the budgets of the
run's user and agent, and the run and tool metrics.

The engine holds one from the start (prices come from the config); the app binds the usage meter and
metrics once they are up. Steps that finish before then are kept and settled at binding, so none is lost.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from strata.cost.budgets import BudgetSubject
from strata.cost.prices import ModelUse, PriceCatalog
from strata.cost.records import UsageEvent
from strata.cost.services import CostServices
from strata.observability.request_metrics import RequestMetrics
from strata.store.tables import Run

_MAX_EARLY = 10_000  # steps held before binding; a start takes seconds, so this is never reached in practice
_KEY_BUDGET_TTL_S = 30.0
KeyBudget = Callable[[str], Awaitable[float | None]]  # a key id -> its own monthly budget (None: none)


class RunAccounting:
    def __init__(self, catalog: PriceCatalog) -> None:
        self.catalog = catalog
        self._cost: CostServices | None = None
        self._metrics: RequestMetrics | None = None
        self._early: list[tuple[UsageEvent, BudgetSubject]] = []
        self._key_budget: KeyBudget | None = None
        self._key_budgets: dict[str, tuple[float | None, float]] = {}  # key id -> (budget, read at)

    def bind(self, cost: CostServices, metrics: RequestMetrics | None, key_budget: KeyBudget | None = None) -> None:
        self._cost, self._metrics, self._key_budget = cost, metrics, key_budget
        self.catalog = cost.catalog
        for event, subject in self._early:
            cost.settle(event, subject)
        self._early.clear()

    async def _budget_of(self, key_id: str | None) -> float | None:
        """The run's key's own budget, re-read at most every 30 s (it may change while a run goes on)."""
        if key_id is None or self._key_budget is None:
            return None
        cached = self._key_budgets.get(key_id)
        if cached is not None and time.monotonic() - cached[1] < _KEY_BUDGET_TTL_S:
            return cached[0]
        budget = await self._key_budget(key_id)
        self._key_budgets[key_id] = (budget, time.monotonic())
        return budget

    def step_cost(self, use: ModelUse) -> float:
        """Priced as a client's chat completion with the same tokens and busy time would be."""
        return self.catalog.charge(use)

    async def model_step(self, run: Run, use: ModelUse, latency_s: float, cost_usd: float) -> None:
        event = UsageEvent(
            ts=datetime.now(UTC),
            request_id=None,
            kind="run_step",
            model=use.model,
            prompt_tokens=use.prompt_tokens,
            completion_tokens=use.completion_tokens,
            cached_tokens=use.cached_tokens,
            latency_s=latency_s,
            cost_usd=cost_usd,
            key_id=run.key_id,
            user=run.owner,
            agent=run.agent,
            run_id=run.id,
        )
        subject = BudgetSubject(run.key_id, run.owner, run.agent, await self._budget_of(run.key_id))
        if self._metrics is not None:
            self._metrics.observe_tokens(use.model, use.prompt_tokens, use.completion_tokens)
            self._metrics.observe_operation(use.model, latency_s)
            self._metrics.observe_cost(use.model, run.key_id or "", cost_usd)
        if self._cost is not None:
            self._cost.settle(event, subject)
        elif len(self._early) < _MAX_EARLY:
            self._early.append((event, subject))

    def tool_called(self, tool: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.tool_called(tool, outcome)

    def run_finished(self, run: Run) -> None:
        if self._metrics is None:
            return
        started = run.created_at if run.created_at.tzinfo else run.created_at.replace(tzinfo=UTC)
        self._metrics.run_finished(run.agent, run.status, (datetime.now(UTC) - started).total_seconds())
