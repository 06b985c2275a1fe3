"""Small JSON views the console draws and that API clients may use too: the last hour's request metrics as
time series (`GET /admin/metrics/series`, see observability/metric_series.py) and the budgets that apply to
the caller with what is left of each (`GET /v1/budgets`)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from strata.api.auth import principal
from strata.api.state import AppState
from strata.api.usage_routes import flushed_usage
from strata.cost.budgets import BudgetSubject
from strata.serving.errors import BackendNotReadyError

router = APIRouter(tags=["metrics"])


@router.get("/admin/metrics/series", summary="This replica's requests/s, errors, latency, TTFT, tokens/s: last hour")
async def metric_series(request: Request) -> Response:
    state: AppState = request.app.state.strata
    if state.series is None:
        raise BackendNotReadyError("Strata is starting; try again shortly")
    body = {"object": "metric_series", "interval_s": state.series.interval_s, "data": state.series.points()}
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/v1/budgets", summary="The budgets that apply to the caller: limit, spent and left this period")
async def budgets(request: Request) -> Response:
    cost = await flushed_usage(request)
    rows = await cost.budgets.standing(BudgetSubject.of(principal(request)))
    return Response(orjson.dumps({"object": "list", "data": rows}), media_type="application/json")
