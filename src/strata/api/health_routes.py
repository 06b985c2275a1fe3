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


def readiness(state: AppState) -> tuple[str, str | None]:
    """`ready`, or why not: still starting (and doing what), shutting down, or no healthy backend."""
    if state.lifecycle.draining:
        return "draining", "shutting down"
    if (doing := state.lifecycle.starting) is not None:
        return "starting", f"still starting: {doing}"
    if not state.router.any_healthy():
        return "not_ready", "no backend is healthy yet"
    return "ready", None


@router.get(
    "/readyz",
    summary="Ready: started, not shutting down, and at least one backend is healthy (MCP servers shown)",
)
async def readyz(request: Request) -> Response:
    state: AppState = request.app.state.strata
    models: dict[str, str] = {}
    for info in state.router.infos():  # a model with several replicas shows a healthy one's state if any
        if info.healthy or info.model not in models:
            models[info.model] = info.state
    status, reason = readiness(state)
    code = 200 if status == "ready" else 503
    body: dict[str, object] = {"status": status, "models": models}
    if state.runtime is not None and (servers := state.runtime.tools.mcp_servers):
        # Shown, but not part of readiness: a tool server that is down must not take the models out of rotation.
        body["mcp_servers"] = {server.name: server.state.value for server in servers}
    if reason:
        body["reason"] = reason
    headers = {"Retry-After": "1"} if code == 503 else None
    return Response(orjson.dumps(body), status_code=code, media_type="application/json", headers=headers)
