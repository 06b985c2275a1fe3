"""Every route's permission, in one place. A route missing here stops the app from starting.

Keys are (method, path template); "WS" marks a WebSocket route. `PUBLIC` routes take no credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from fastapi import FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute, iter_route_contexts

from strata.security.rbac import Permission as P


class _Public:
    def __repr__(self) -> str:
        return "PUBLIC"


PUBLIC: Final = _Public()
Policy = P | _Public

ROUTE_PERMISSIONS: dict[tuple[str, str], Policy] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): P.METRICS_READ,  # PUBLIC when security.public_metrics is set
    ("GET", "/openapi.json"): P.API_SCHEMA_READ,
    ("GET", "/v1/me"): P.API_SCHEMA_READ,
    # the console (strata/console/): its pages and assets hold no data; logging in checks the key itself
    ("GET", "/"): PUBLIC,
    ("GET", "/console"): PUBLIC,
    ("GET", "/console/assets/{path:path}"): PUBLIC,
    ("POST", "/console/login"): PUBLIC,
    ("POST", "/console/logout"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/assets/{path:path}"): PUBLIC,
    ("GET", "/admin/metrics/series"): P.METRICS_READ,
    ("GET", "/v1/budgets"): P.RUNS_READ,  # the budgets that apply to the caller
    # OpenAI-compatible
    ("POST", "/v1/chat/completions"): P.MODELS_INVOKE,
    ("GET", "/v1/models"): P.MODELS_READ,
    ("POST", "/v1/responses"): P.MODELS_INVOKE,  # model "agent:<name>" needs agents:invoke too
    ("GET", "/v1/responses/{response_id}"): P.MODELS_INVOKE,  # one's own responses only
    ("DELETE", "/v1/responses/{response_id}"): P.MODELS_INVOKE,
    ("GET", "/v1/models/{model_id:path}"): P.MODELS_READ,
    ("POST", "/v1/embeddings"): P.MODELS_INVOKE,
    ("POST", "/v1/completions"): P.MODELS_INVOKE,
    # agents, sessions, runs (ownership is checked per resource, see api/ownership.py)
    ("GET", "/v1/agents"): P.AGENTS_READ,
    ("GET", "/v1/agents/{name}"): P.AGENTS_READ,
    ("POST", "/v1/agents/{agent}/runs"): P.AGENTS_INVOKE,
    ("WS", "/v1/agents/{agent}/ws"): P.AGENTS_INVOKE,
    ("POST", "/v1/sessions"): P.AGENTS_INVOKE,
    ("GET", "/v1/runs"): P.RUNS_READ,  # lists: one's own rows; runs:read_all sees everyone's (api/list_routes.py)
    ("GET", "/v1/sessions"): P.RUNS_READ,
    ("GET", "/v1/traces"): P.RUNS_READ,
    ("GET", "/v1/sessions/{session_id}"): P.RUNS_READ,
    ("GET", "/v1/sessions/{session_id}/messages"): P.RUNS_READ,
    ("GET", "/v1/runs/{run_id}"): P.RUNS_READ,
    ("GET", "/v1/runs/{run_id}/events"): P.RUNS_READ,
    ("GET", "/v1/runs/{run_id}/steps"): P.RUNS_READ,
    ("POST", "/v1/runs/{run_id}/cancel"): P.AGENTS_INVOKE,
    ("POST", "/v1/runs/{run_id}/approval"): P.AGENTS_INVOKE,
    ("GET", "/v1/runs/{run_id}/trace"): P.RUNS_READ,
    ("GET", "/v1/traces/{trace_id}"): P.RUNS_READ,  # spans of one's own runs; runs:read_all sees all
    ("GET", "/v1/usage"): P.RUNS_READ,  # one's own usage; usage:read_all sees everyone's
    # administration
    ("PUT", "/admin/agents/{name}"): P.AGENTS_WRITE,
    ("GET", "/admin/agents/{name}/versions"): P.AGENTS_READ,
    ("GET", "/admin/deployments"): P.DEPLOYMENTS_READ,
    ("GET", "/admin/models"): P.DEPLOYMENTS_READ,
    ("POST", "/admin/models/{name}/deploy"): P.DEPLOYMENTS_WRITE,
    ("POST", "/admin/reload"): P.CONFIG_WRITE,
    ("GET", "/admin/gpus"): P.GPUS_READ,
    ("GET", "/admin/mcp-servers"): P.DEPLOYMENTS_READ,
    ("GET", "/admin/keys"): P.KEYS_MANAGE,
    ("POST", "/admin/keys"): P.KEYS_MANAGE,
    ("GET", "/admin/keys/{key_id}"): P.KEYS_MANAGE,
    ("PATCH", "/admin/keys/{key_id}"): P.KEYS_MANAGE,
    ("POST", "/admin/keys/{key_id}/rotate"): P.KEYS_MANAGE,
    ("POST", "/admin/keys/{key_id}/revoke"): P.KEYS_MANAGE,
    ("GET", "/admin/audit"): P.AUDIT_READ,
    ("GET", "/admin/audit/verify"): P.AUDIT_READ,
}


class UndeclaredRoute(RuntimeError):
    pass


def route_policies(app: FastAPI, *, public_metrics: bool) -> dict[Callable[..., Any], Policy]:
    """Endpoint -> policy for every route of the app; raises for a route with no declared permission."""
    policies: dict[Callable[..., Any], Policy] = {}
    for route in app_routes(app):
        for method in route.methods:
            policy = ROUTE_PERMISSIONS.get((method, route.path))
            if policy is None:
                raise UndeclaredRoute(f"route {method} {route.path} declares no permission in api/permissions.py")
            if public_metrics and route.path == "/metrics":
                policy = PUBLIC
            previous = policies.setdefault(route.endpoint, policy)
            if previous is not policy:
                raise UndeclaredRoute(f"{route.path}: one endpoint serves methods with different permissions")
    return policies


@dataclass(frozen=True)
class RouteInfo:
    path: str
    methods: frozenset[str]  # "WS" for a WebSocket route
    endpoint: Callable[..., Any]


def app_routes(app: FastAPI) -> list[RouteInfo]:
    """Every route of the app, through FastAPI's included routers; anything else is refused."""
    found = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIWebSocketRoute):
            methods = frozenset({"WS"})
        elif isinstance(route, APIRoute):
            methods = frozenset(route.methods) - {"HEAD"}
        else:
            raise UndeclaredRoute(f"route {route!r} is not a FastAPI route; declare it in api/permissions.py")
        path = context.path or route.path
        found.append(RouteInfo(path, methods, route.endpoint))
    return found


# Health probes and metric scrapes: every few seconds from every load balancer and Prometheus. They are never
# traced (of no interest in a trace) and never shed (a shedding server must still look alive).
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Static files of the console and of the API reference: no credentials, and no route per file.
PUBLIC_PREFIXES = ("/console/assets/", "/docs/assets/")
STARTUP_PROBES = frozenset({"/healthz", "/readyz"})  # what answers while Strata starts (api/starting.py)


def public_paths(public_metrics: bool) -> frozenset[str]:
    paths = {path for (_, path), policy in ROUTE_PERMISSIONS.items() if policy is PUBLIC}
    return frozenset(paths | ({"/metrics"} if public_metrics else set()))
