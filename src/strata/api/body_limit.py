"""413 for request bodies over `limits.max_body_bytes`, before they are read into memory.

Pure ASGI: a declared Content-Length over the limit is refused at once; a chunked body is counted as
it arrives and refused when it crosses the limit.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.api.errors import ApiError, error_response

_CONTENT_LENGTH = b"content-length"


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == _CONTENT_LENGTH), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        if declared is not None:  # the server holds the client to its Content-Length
            await self.app(scope, receive, send)
            return
        seen = 0
        too_large = False
        answered = False

        async def counting_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # A route whose body FastAPI parses turns our exception into its own 400: answer 413 instead.
            nonlocal answered
            if too_large:
                if message["type"] == "http.response.start" and not answered:
                    answered = True
                    await self._refuse(scope, receive, send)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if not answered:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(
            413,
            f"the request body is larger than the limit of {self.max_bytes} bytes (limits.max_body_bytes)",
            code="body_too_large",
        )
        await error_response(error)(scope, receive, send)
