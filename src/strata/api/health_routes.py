"""Liveness and readiness, for people and for orchestrators (Kubernetes probes, load balancers)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from strata.api.state import AppState

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive: the process answers")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz", summary="Ready: not shutting down, and at least one backend is healthy (MCP servers shown)")
async def readyz(request: Request) -> Response:
    state: AppState = request.app.state.strata
    models: dict[str, str] = {}
    for info in state.router.infos():  # a model with several replicas shows a healthy one's state if any
        if info.healthy or info.model not in models:
            models[info.model] = info.state
    if state.lifecycle.draining:
        status, code, reason = "draining", 503, "shutting down"
    elif not state.router.any_healthy():
        status, code, reason = "not_ready", 503, "no backend is healthy yet"
    else:
        status, code, reason = "ready", 200, None
    body: dict[str, object] = {"status": status, "models": models}
    if state.runtime is not None and (servers := state.runtime.tools.mcp_servers):
        # Shown, but not part of readiness: a tool server that is down must not take the models out of rotation.
        body["mcp_servers"] = {server.name: server.state.value for server in servers}
    if reason:
        body["reason"] = reason
    headers = {"Retry-After": "1"} if code == 503 else None
    return Response(orjson.dumps(body), status_code=code, media_type="application/json", headers=headers)
