"""Request count and latency by route template, method, model and status, for every HTTP request.

Pure ASGI (no BaseHTTPMiddleware): it runs on every request, so it costs a few perf_counter calls,
one wrapped `send` and two metric updates. The route label is the matched route's template
(`/v1/runs/{run_id}`), found from `scope["endpoint"]`, which routing sets on the shared scope, through
a table built once from the app's routes. A request refused before routing (401, 413, 429 from the
middlewares inside this one) is matched against the same templates; a path no route has is counted
under `unmatched`, so clients cannot grow the label set.

Routes tell this middleware more through the scope:
- `set_model(scope, name)`: the model the request asked for (the `model` label; unknown names are
  counted as `other`, see `RequestMetrics.model_label`).
- `with waiting_on_backend(scope): ...` around each awaited backend call: that time is not Strata's
  own, see `strata_overhead_seconds` below.
- `request_started_at(scope)`: when the request arrived (a perf_counter reading), for TTFT.

`strata_overhead_seconds{route}` is recorded only for requests that called a backend: the time from
the request's arrival here to the response's start (`http.response.start`) minus the time spent
inside `waiting_on_backend` blocks before it (connecting, queueing for admission, waiting for the
first byte or the whole reply, retries and their backoff). It is what Strata adds in front of the
backend: authentication, rate limits, parsing, routing, usage counting. Streamed bytes after the
response started are not counted in it (they pass through the relay as they come).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any

from fastapi.routing import iter_route_contexts
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.observability.request_metrics import RequestMetrics

MODEL = "strata.model"
STARTED = "strata.started"
BACKEND_S = "strata.backend_s"
UNMATCHED = "unmatched"


def set_model(scope: Scope, model: str | None) -> None:
    scope[MODEL] = model


def request_started_at(scope: Scope) -> float | None:
    return scope.get(STARTED)


@contextmanager
def waiting_on_backend(scope: Scope) -> Iterator[None]:
    """Time spent in the block counts as the backend's, not Strata's (works around `await`s)."""
    started = perf_counter()
    try:
        yield
    finally:
        scope[BACKEND_S] = scope.get(BACKEND_S, 0.0) + (perf_counter() - started)


class _RouteTable:
    """Endpoint -> path template, and the templates' regexes for requests that never reached routing."""

    def __init__(self, app: Any) -> None:
        self.by_endpoint: dict[Callable[..., Any], str] = {}
        self.patterns: list[tuple[re.Pattern[str], str]] = []
        for context in iter_route_contexts(getattr(app, "routes", ())):
            route = context.original_route
            path = context.path or getattr(route, "path", None)
            endpoint = context.endpoint or getattr(route, "endpoint", None)
            if not path:
                continue
            if endpoint is not None:
                self.by_endpoint.setdefault(endpoint, path)
            self.patterns.append((compile_path(path)[0], path))

    def template(self, scope: Scope) -> str:
        endpoint = scope.get("endpoint")
        if endpoint is not None:
            path = self.by_endpoint.get(endpoint)
            if path is not None:
                return path
        route_path = scope.get("path", "")
        for pattern, path in self.patterns:
            if pattern.match(route_path):
                return path
        return UNMATCHED


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._routes: _RouteTable | None = None  # built on the first request: every route exists by then

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        scope[STARTED] = started
        status = 500  # an exception before the response started is answered 500 outside this middleware
        response_at: float | None = None
        backend_s: float | None = None  # backend time before the response started
        ended_at: float | None = None

        async def measuring_send(message: Message) -> None:
            nonlocal status, response_at, backend_s, ended_at
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                response_at = perf_counter()
                backend_s = scope.get(BACKEND_S)
            elif kind == "http.response.body" and not message.get("more_body", False):
                ended_at = perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, measuring_send)
        finally:
            end = ended_at if ended_at is not None else perf_counter()
            routes = self._routes
            if routes is None:
                routes = self._routes = _RouteTable(scope["app"]) if "app" in scope else _RouteTable(None)
            route = routes.template(scope)
            self.metrics.observe_request(route, scope["method"], scope.get(MODEL), status, end - started)
            if backend_s is not None and response_at is not None:
                self.metrics.observe_overhead(route, response_at - started - backend_s)
