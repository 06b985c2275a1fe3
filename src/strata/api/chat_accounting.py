"""The bookkeeping around one chat completion: the budget check before it, and after it the tokens,
the cost, the usage row, the metrics and the key's tokens-per-minute window. None of it waits on the
database: usage rows and budget spends go to background writers.

A stream that fails after its 200 went out cannot say so in its status code: `stream_failed` counts it
(`strata_stream_errors_total`) and logs it, so error rates and alerts see it."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from datetime import UTC, datetime

import structlog
from starlette.requests import Request
from starlette.responses import Response

from strata.api.auth import principal
from strata.api.disconnect import cancel_on_disconnect
from strata.api.errors import from_serving_error
from strata.api.metrics_middleware import request_started_at, set_model, waiting_on_backend
from strata.api.request_id import current_request_id
from strata.api.state import AppState
from strata.api.usage_routes import budget_refusal
from strata.cost.prices import ModelUse
from strata.cost.records import UsageEvent, UsageKind
from strata.security.principal import Principal
from strata.serving.chat import Completion
from strata.serving.errors import ServingError
from strata.serving.usage import Usage

log = structlog.get_logger("strata.chat")
COST_HEADER = "x-strata-cost-usd"
OPERATIONS = {"chat": "chat", "embeddings": "embeddings", "completions": "text_completion", "run_step": "chat"}


async def admit_budget(state: AppState, who: Principal, agent: str | None) -> None:
    """Refuse (429) before any work when a hard budget of this key, user or agent is spent."""
    cost = state.cost
    if cost is None:
        return
    decision = await cost.budgets.check(who, agent)
    if not decision.allowed:
        if state.request_metrics is not None and decision.budget is not None:
            state.request_metrics.budget_refused(decision.budget.scope)
        raise budget_refusal(decision)


class ChatAccount:
    """The accounts of one model call from a client: chat, and the embeddings and text completions alike."""

    def __init__(self, request: Request, model: str, kind: UsageKind = "chat") -> None:
        self.kind: UsageKind = kind
        self.state: AppState = request.app.state.strata
        self.scope = request.scope
        self.who: Principal = principal(request)
        self.requested = model  # the `model` label of the request's metrics
        self.model = model  # priced as: the model that answered once settled
        self.started = request_started_at(request.scope) or time.perf_counter()
        set_model(request.scope, model)

    async def admit(self) -> None:
        await admit_budget(self.state, self.who, None)

    def settle(
        self,
        usage: Usage | None,
        *,
        status: int = 200,
        error_type: str = "",
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        busy_s: float = 0.0,
        served_by: str = "",
    ) -> float:
        """Record what the call used and cost (priced as the model that answered); returns the cost in USD."""
        latency = time.perf_counter() - self.started
        if served_by:
            self.model = served_by
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        cost = self.state.cost
        usd = cost.catalog.charge(ModelUse(self.model, prompt, completion, busy_s=busy_s)) if cost else 0.0
        metrics = self.state.request_metrics
        if metrics is not None:
            operation = OPERATIONS[self.kind]
            metrics.observe_operation(self.model, latency, error_type=error_type, operation=operation)
            if usage is not None:
                metrics.observe_tokens(self.model, prompt, completion, operation=operation)
            metrics.observe_cost(self.model, self.who.key_id or "", usd)
            if ttft_s is not None:
                metrics.observe_ttft(self.model, ttft_s)
            if tpot_s is not None:
                metrics.observe_tpot(self.model, tpot_s)
        if cost is not None:
            event = UsageEvent(
                ts=datetime.now(UTC),
                request_id=current_request_id(),
                kind=self.kind,
                model=self.model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_s=latency,
                cost_usd=usd,
                key_id=self.who.key_id,
                user=self.who.user,
                ttft_s=ttft_s,
                status=status,
            )
            cost.settle(event, self.who)
        if self.state.guard is not None and usage is not None:
            self.state.guard.count_tokens(self.who, usage.total_tokens)
        return usd

    def failed(self, error: ServingError) -> None:
        """Settle a call that failed before any of its answer went out."""
        self.settle(None, status=from_serving_error(error).status, error_type=error.code or type(error).__name__)

    def stream_failed(self, error: ServingError, deployment: str, chunks: int) -> None:
        """One line and one count for a stream cut short after it started (the client got an error event)."""
        if self.state.request_metrics is not None:
            self.state.request_metrics.stream_failed(self.requested, error.code)
        log.warning(
            "stream failed after it started",
            deployment=error.deployment or deployment,
            chunks_relayed=chunks,
            error_type=error.code,
            error=error.message,
        )


async def answer_settled(request: Request, account: ChatAccount, work: Awaitable[Completion]) -> Response:
    """A call answered in one piece: wait for it (it stops when the client leaves), settle what it used and cost,
    failed or not, and answer its body with the cost header."""
    try:
        with waiting_on_backend(request.scope):
            completion = await cancel_on_disconnect(request, work)
    except ServingError as exc:
        account.failed(exc)
        raise
    usd = account.settle(completion.usage, busy_s=completion.busy_s, served_by=completion.model)
    return Response(completion.body, media_type="application/json", headers={COST_HEADER: f"{usd:.9f}"})
