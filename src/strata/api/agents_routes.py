"""Agents: list and inspect them; create and update them (each update is a new version)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from strata.api.auth import audit
from strata.api.errors import ApiError, invalid_body
from strata.api.state import AppState
from strata.config import AgentConfig

router = APIRouter(tags=["agents"])


def _state(request: Request) -> AppState:
    return request.app.state.strata


@router.get("/v1/agents", summary="The agents this Strata runs")
async def list_agents(request: Request) -> Response:
    catalog = _state(request).agent_service().catalog
    data = []
    for name in await catalog.names():
        version, spec = await catalog.latest(name)
        data.append({"name": name, "version": version, **spec.model_dump(mode="json")})
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.get("/v1/agents/{name}", summary="An agent's current spec")
async def get_agent(name: str, request: Request) -> Response:
    version, spec = await _state(request).agent_service().agent(name)
    return Response(orjson.dumps({"name": name, "version": version, **spec.model_dump(mode="json")}),
                    media_type="application/json")  # fmt: skip


@router.put("/admin/agents/{name}", summary="Create an agent or publish a new version of it")
async def put_agent(name: str, request: Request) -> Response:
    state = _state(request)
    try:
        body = orjson.loads(await request.body())
        spec = AgentConfig.model_validate({**body, "name": name} if isinstance(body, dict) else body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise invalid_body(exc.errors(include_url=False)) from None
    for model in filter(None, (spec.model, spec.fallback_model)):
        if model not in state.router.models:
            raise ApiError(400, f"model {model!r} is not served here (models: {', '.join(state.router.models)})",
                           param="model")  # fmt: skip
    tools = state.agent_runtime().tools
    missing = [t for t in spec.tools if tools.get(t) is None]
    if missing:
        raise ApiError(400, f"unknown tools: {', '.join(missing)} (available: {', '.join(tools.names)})", param="tools")
    version = await state.agent_service().catalog.put(spec)
    audit(request, "agent.published", f"agent {name}", {"version": version, "model": spec.model, "tools": spec.tools})
    view = {"name": name, "version": version, **spec.model_dump(mode="json")}
    return Response(orjson.dumps(view), status_code=200 if version > 1 else 201, media_type="application/json")


@router.get("/admin/agents/{name}/versions", summary="Every version of an agent")
async def agent_versions(name: str, request: Request) -> Response:
    catalog = _state(request).agent_service().catalog
    await _state(request).agent_service().agent(name)
    rows = await catalog.versions(name)
    data = [{"version": r.version, "source": r.source, "created_at": r.created_at.isoformat(), "spec": r.spec}
            for r in rows]  # fmt: skip
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")
