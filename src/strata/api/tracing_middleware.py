"""The server span of every request: `POST /v1/chat/completions`, with the HTTP semantic-convention
attributes, joined to the caller's trace when it sends a W3C `traceparent`.

Pure ASGI, placed outside authentication so refused requests (401, 403, 429) are traced too. The span is
current while the app runs, so every span the request makes is its child and every log line carries its
trace id; the response carries the span's own `traceparent`, so a client can find its trace
(`GET /v1/traces/{trace_id}`). Not installed at all when tracing is disabled.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.api.permissions import PROBE_PATHS, UndeclaredRoute, app_routes
from strata.api.request_id import current_request_id
from strata.observability import tracing_genai as genai
from strata.observability.tracing import SpanKind, Tracing, activate, extract, fail, trace_ids, traceparent

_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"


class TracingMiddleware:
    def __init__(self, app: ASGIApp, tracing: Tracing, untraced: frozenset[str] = PROBE_PATHS) -> None:
        self.app = app
        self.tracing = tracing
        self.untraced = untraced
        self._templates: list[tuple[re.Pattern[str], frozenset[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] in self.untraced:
            await self.app(scope, receive, send)
            return
        parent_value = state = None
        for name, value in scope["headers"]:
            if name == _TRACEPARENT:
                parent_value = value.decode("latin-1")
            elif name == _TRACESTATE:
                state = value.decode("latin-1")
        parent = extract(parent_value, state) if parent_value else None
        method = scope.get("method", "GET") if kind == "http" else "WS"  # a WebSocket's span: "WS /v1/agents/..."
        attributes: dict[str, Any] = {
            "http.request.method": scope.get("method", "GET"),
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
        }
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        request_id = current_request_id()
        if request_id:
            attributes[genai.REQUEST_ID] = request_id
        span = self.tracing.start_span(method, kind=SpanKind.SERVER, attributes=attributes, parent=parent)
        ids = trace_ids(span)
        if ids is not None:  # stays bound after the app returns, like the request id: the error handler logs later
            structlog.contextvars.bind_contextvars(trace_id=ids[0], span_id=ids[1])
        header = traceparent(span)
        response_header = (_TRACEPARENT, header.encode()) if header else None
        status: list[int] = []

        async def send_traced(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                status.append(message["status"])
                if response_header is not None:
                    message["headers"] = [*message.get("headers", ()), response_header]
            await send(message)

        try:
            with activate(span, parent, end=False):
                await self.app(scope, receive, send_traced)
        except Exception:
            if not status:
                status.append(500)  # what the server-error handler outside this middleware answers
            raise
        finally:
            self._finish(span, scope, method, status[0] if status else None)

    def _finish(self, span: Any, scope: Scope, method: str, status: int | None) -> None:
        try:
            if span.is_recording():
                route = scope.get("route")
                template = getattr(route, "path", None) or self._template(scope, method)
                if template:
                    span.set_attribute("http.route", template)
                    span.update_name(f"{method} {template}")
                if status is not None:
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        fail(span, error_type=str(status), message=f"HTTP {status}")
        finally:
            span.end()

    def _template(self, scope: Scope, method: str) -> str | None:
        """The route template of a request answered before routing (a refusal by authentication); None for
        a path no route has (the span is then named by the method alone, as the conventions ask)."""
        if self._templates is None:
            app = scope.get("app")  # the FastAPI app, set by Starlette before any middleware runs
            if app is None:
                return None
            try:
                routes = app_routes(app)
            except UndeclaredRoute:  # a route FastAPI did not make (never in Strata: the app would not start)
                routes = []
            self._templates = [(compile_path(route.path)[0], route.methods, route.path) for route in routes]
        path = scope["path"]
        for pattern, methods, template in self._templates:
            if method in methods and pattern.match(path):
                return template
        return None
