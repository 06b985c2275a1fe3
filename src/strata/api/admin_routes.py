"""Operator views of the serving layer: every deployment with its health, load and breaker."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from strata.api.state import AppState

router = APIRouter(tags=["admin"])


@router.get("/admin/deployments", summary="Each deployment: health, load, circuit breaker")
async def list_deployments(request: Request) -> Response:
    state: AppState = request.app.state.strata
    data = []
    for deployment in state.router.deployments:
        breaker = await deployment.breaker.snapshot()
        data.append(
            {
                "model": deployment.model,
                "deployment": deployment.name,
                "kind": deployment.kind,
                "target": deployment.client.base_url,
                "weight": deployment.weight,
                "healthy": deployment.healthy,
                "state": deployment.state,
                "in_flight": deployment.admission.in_flight,
                "queued": deployment.admission.queued,
                "breaker": {
                    "state": breaker.state.value,
                    "consecutive_failures": breaker.consecutive_failures,
                    "window_failures": breaker.window_failures,
                    "window_requests": breaker.window_requests,
                    "retry_in_s": round(breaker.retry_in_s, 3),
                    "shared_store_ok": breaker.store_ok,
                },
            }
        )
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")
