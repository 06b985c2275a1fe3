"""`GET /v1/usage`: requests, tokens, cost and latency percentiles, grouped by key, user, agent, model or day.

A caller without `usage:read_all` sees only its own user's usage. Also `budget_refusal`, the 429 of a
refused budget check, for the routes that start work."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from strata.api.auth import principal
from strata.api.errors import ApiError
from strata.cost.budgets import BudgetDecision
from strata.cost.query import UsageQuery, iso
from strata.cost.services import CostServices
from strata.security.rbac import Permission
from strata.serving.errors import BackendNotReadyError

router = APIRouter(tags=["usage"])
FLUSH_WAIT_S = 2.0


@router.get("/v1/usage", summary="Requests, tokens, cost and p50/p95 latency, grouped")
async def usage(request: Request, query: Annotated[UsageQuery, Query()]) -> Response:
    who = principal(request)
    user = query.user
    if not who.may(Permission.USAGE_READ_ALL):
        if user is not None and user != who.user:
            raise ApiError(403, "you may read only your own usage", type_="permission_error", code="forbidden")
        user = who.user
    cost = await flushed_usage(request)
    since, until = query.since, query.until
    rows = await cost.store.aggregate(query.group_by, since, until, user=user, kind=query.kind, limit=query.limit)
    totals = await cost.store.aggregate(None, since, until, user=user, kind=query.kind)
    body = {
        "object": "usage",
        "group_by": query.group_by,
        "from": iso(since),
        "to": iso(until),
        "user": user,
        "kind": query.kind,
        "data": [row.to_json() for row in rows],
        "total": totals[0].to_json() if totals else None,
    }
    return Response(orjson.dumps(body), media_type="application/json")


def budget_refusal(decision: BudgetDecision) -> ApiError:
    """The 429 for a refused budget check: says which budget and when it resets; Retry-After until then."""
    budget = decision.budget
    extra = {}
    if budget is not None and decision.resets_at is not None:
        extra = {
            "budget": {
                "scope": budget.scope,
                "name": decision.subject,
                "period": budget.period,
                "limit_usd": budget.limit_usd,
                "spent_usd": round(decision.spent_usd, 9),
                "resets_at": iso(decision.resets_at),
            }
        }
    return ApiError(
        429,
        decision.message,
        type_="insufficient_quota",
        code="budget_exceeded",
        headers=decision.headers,
        extra=extra,
    )


async def flushed_usage(request: Request) -> CostServices:
    """The cost services, once what this replica metered a moment ago is written: part of the answer."""
    cost = _services(request)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(cost.meter.flush(), FLUSH_WAIT_S)
    return cost


def _services(request: Request) -> CostServices:
    cost: CostServices | None = getattr(request.app.state.strata, "cost", None)
    if cost is None:
        raise BackendNotReadyError("cost control is starting; try again shortly")
    return cost
