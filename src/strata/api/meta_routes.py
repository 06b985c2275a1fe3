"""The API's own description (`/openapi.json`, behind credentials) and `/v1/me` (who am I)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from strata.api.auth import principal
from strata.api.permissions import public_paths
from strata.security.rbac import Permission

router = APIRouter(tags=["meta"])
PUBLIC_ROUTES = public_paths(public_metrics=False)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> Response:
    schema = dict(request.app.openapi())  # FastAPI caches it: add to a copy
    components = dict(schema.get("components") or {})
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "An sk-strata- API key or a JWT"}
    }
    schema["components"] = components
    schema["security"] = [{"bearer": []}]
    paths = dict(schema.get("paths") or {})
    for path in PUBLIC_ROUTES:
        if path in paths:
            paths[path] = {method: {**op, "security": []} for method, op in paths[path].items()}
    schema["paths"] = paths
    return Response(orjson.dumps(schema), media_type="application/json")


@router.get("/v1/me", summary="The caller's identity, role and limits")
async def me(request: Request) -> Response:
    who = principal(request)
    view = {
        "user": who.user,
        "role": who.role,
        "via": who.via,
        "key_id": who.key_id,
        "name": who.name,
        "models": sorted(who.models) if who.models is not None else None,
        "agents": sorted(who.agents) if who.agents is not None else None,
        "rpm": who.rpm,
        "tpm": who.tpm,
        "budget_usd": who.budget_usd,
        "permissions": [p.value for p in Permission if who.may(p)],  # what a client (the console) may offer
    }
    return Response(orjson.dumps(view), media_type="application/json")
