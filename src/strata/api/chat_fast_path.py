"""`POST /v1/chat/completions` straight to its endpoint, past FastAPI's router and dependency solver.

It is Strata's hottest route by far, and the one whose added latency users compare with calling the backend
directly. It takes the raw body and no parameters, so FastAPI has nothing to do for it but match the path,
solve the app-wide `authorize` dependency and wrap the call: together about a sixth of the route's CPU.
This middleware, inside authentication, does exactly what that machinery did for this one route: it marks the
scope as routed to it (metrics and the span read the route from there), runs `authorize`, calls the endpoint,
and answers an exception with the handler the app registered for it. The route stays declared in FastAPI
(the OpenAPI schema, the permission table and every other method on the path still go through the router).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from strata.api.auth import authorize
from strata.api.openai_routes import chat_completions

PATH = "/v1/chat/completions"
Handler = Callable[[Request, Exception], Awaitable[Response]]


class ChatFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._route: APIRoute | None = None
        self._handlers: dict[Any, Handler] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self._route is None:
            self._bind(scope["app"])
        scope["endpoint"] = chat_completions
        scope["route"] = self._route
        request = Request(scope, receive, send)
        try:
            await authorize(request)
            response = await chat_completions(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise  # as from the router: the server-error handler answers 500
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _bind(self, app: FastAPI) -> None:
        """The route and the app's exception handlers, on the first request: both exist by then."""
        self._route = next(
            context.original_route
            for context in iter_route_contexts(app.routes)
            if getattr(context.original_route, "endpoint", None) is chat_completions
        )
        self._handlers = {key: handler for key, handler in app.exception_handlers.items() if isinstance(key, type)}

    def _handler_for(self, exc: Exception) -> Handler | None:
        for kind in type(exc).__mro__:
            if kind is Exception:  # the catch-all is the server-error handler's, outside this middleware
                return None
            handler = self._handlers.get(kind)
            if handler is not None:
                return handler
        return None
