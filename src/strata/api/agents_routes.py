"""Agents: list and inspect them; create and update them (each update is a new version).

Publishing needs `agents:write`; a version that weakens a guard (agents/guard_changes.py) needs
`agents:weaken_guards` too (admins). Every publication, and every refused one, is audited with the
caller and the spec before and after."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from strata.agents.guard_changes import audit_view, changed_fields, weakenings
from strata.api.auth import audit, principal
from strata.api.errors import ApiError, invalid_body
from strata.api.state import AppState
from strata.config import AgentConfig
from strata.security.rbac import Permission
from strata.store.agents import VersionConflict

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
    catalog = state.agent_service().catalog
    previous, before = await catalog.current(name)
    if spec.entrypoint is not None and spec.entrypoint != (before.entrypoint if before else None):
        # Code is named in the config file only: an API caller must not make the server import any module it likes.
        now = before.entrypoint if before else None
        raise ApiError(400, "an agent's entrypoint is set in the config file, not through the API "
                       f"(agent {name!r} has {now!r})", param="entrypoint")  # fmt: skip
    weakened = weakenings(before, spec)
    details = _change(previous, before, spec, weakened)
    if weakened and not principal(request).may(Permission.AGENTS_WEAKEN_GUARDS):
        audit(request, "agent.published", f"agent {name}", details, outcome="denied")
        raise ApiError(
            403,
            f"only an admin may weaken agent {name!r}'s guards; this version would: {'; '.join(weakened)}",
            type_="permission_error",
            code="guard_weakening_not_allowed",
        )
    try:
        version = await catalog.put(spec, after=previous)
    except VersionConflict:
        raise ApiError(409, f"agent {name!r} changed while this version was checked; read it again and retry",
                       code="agent_changed") from None  # fmt: skip
    audit(request, "agent.published", f"agent {name}", {"version": version, **details})
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


def _change(previous: int, before: AgentConfig | None, after: AgentConfig, weakened: list[str]) -> dict[str, object]:
    """An audit row's details for a publication: the spec before and after (prompts by digest), what changed."""
    old, new = audit_view(before), audit_view(after)
    assert new is not None
    return {"previous_version": previous or None, "changed": changed_fields(old, new), "weakens": weakened,
            "before": old, "after": new}  # fmt: skip
