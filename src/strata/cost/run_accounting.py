"""What an agent run's steps cost, and where that goes: a usage row per model step, the budgets of the
run's user and agent, and the run and tool metrics.

The engine holds one from the start (prices come from the config); the app binds the usage meter and
metrics once they are up. Steps that finish before then are kept and settled at binding, so none is lost.
"""

from __future__ import annotations

from datetime import UTC, datetime

from strata.cost.budgets import BudgetSubject
from strata.cost.prices import PriceCatalog
from strata.cost.records import UsageEvent
from strata.cost.services import CostServices
from strata.observability.request_metrics import RequestMetrics
from strata.store.tables import Run

_MAX_EARLY = 10_000  # steps held before binding; a start takes seconds, so this is never reached in practice


class RunAccounting:
    def __init__(self, catalog: PriceCatalog) -> None:
        self.catalog = catalog
        self._cost: CostServices | None = None
        self._metrics: RequestMetrics | None = None
        self._early: list[UsageEvent] = []

    def bind(self, cost: CostServices, metrics: RequestMetrics | None) -> None:
        self._cost, self._metrics = cost, metrics
        self.catalog = cost.catalog
        for event in self._early:
            cost.settle(event, BudgetSubject(None, event.user, event.agent))
        self._early.clear()

    def step_cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        return self.catalog.cost(model, prompt_tokens, completion_tokens)

    def model_step(
        self, run: Run, model: str, prompt_tokens: int, completion_tokens: int, latency_s: float, cost_usd: float
    ) -> None:
        event = UsageEvent(
            ts=datetime.now(UTC),
            request_id=None,
            kind="run_step",
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency_s,
            cost_usd=cost_usd,
            user=run.owner,
            agent=run.agent,
            run_id=run.id,
        )
        if self._metrics is not None:
            self._metrics.observe_tokens(model, prompt_tokens, completion_tokens)
            self._metrics.observe_operation(model, latency_s)
            self._metrics.observe_cost(model, "", cost_usd)
        if self._cost is not None:
            self._cost.settle(event, BudgetSubject(None, run.owner, run.agent))
        elif len(self._early) < _MAX_EARLY:
            self._early.append(event)

    def tool_called(self, tool: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.tool_called(tool, outcome)

    def run_finished(self, run: Run) -> None:
        if self._metrics is None:
            return
        started = run.created_at if run.created_at.tzinfo else run.created_at.replace(tzinfo=UTC)
        self._metrics.run_finished(run.agent, run.status, (datetime.now(UTC) - started).total_seconds())
