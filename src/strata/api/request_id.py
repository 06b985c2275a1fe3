"""Request ids: honour the caller's `X-Request-ID`, else make one; return it and log it everywhere."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_request_id: ContextVar[str | None] = ContextVar("strata_request_id", default=None)
_ACCEPTABLE = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")
_HEADER = b"x-request-id"


def current_request_id() -> str | None:
    return _request_id.get()


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it runs on every request, so it must cost next to nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((value for name, value in scope["headers"] if name == _HEADER), None)
        request_id = raw.decode() if raw and _ACCEPTABLE.match(raw) else uuid.uuid4().hex
        _request_id.set(request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        header = (_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == _HEADER for name, _ in headers):  # error responses set it already
                    headers.append(header)
                message["headers"] = headers
            await send(message)

        # The id stays bound after the app returns or raises: the server-error handler (which runs
        # outside this middleware) logs and answers an unexpected exception under the same id. Each
        # request runs in its own task, so nothing leaks into the next one.
        await self.app(scope, receive, send_with_id)
