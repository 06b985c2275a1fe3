"""An RPC as the REST request it stands for: metadata to headers, HTTP errors to gRPC statuses, SSE to messages.

Deadlines and cancellation carry over: grpc.aio cancels a handler whose client went away or whose deadline
passed, and `Exchange.close` then shows the app a disconnected client, which stops the backend work the way an
HTTP client leaving does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from starlette.types import ASGIApp

from strata.api.grpc_api.asgi_call import Exchange, call

# Metadata passed on as request headers (gRPC metadata keys are lower-case already).
FORWARDED = ("authorization", "x-api-key", "traceparent", "tracestate", "x-request-id", "idempotency-key")
ERROR_TRAILER = "strata-error-bin"

STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(http_status: int) -> grpc.StatusCode:
    return STATUS_CODES.get(http_status, grpc.StatusCode.UNKNOWN if http_status < 500 else grpc.StatusCode.INTERNAL)


@dataclass(frozen=True, slots=True)
class SseEvent:
    id: str | None
    event: str | None
    data: dict[str, Any]


class Bridge:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def _open(self, context: grpc.aio.ServicerContext, method: str, path: str, body: Any, query: str) -> Exchange:
        headers = [("content-type", "application/json"), ("user-agent", "strata-grpc")]
        headers += [(k, v) for k, v in context.invocation_metadata() or () if k in FORWARDED and isinstance(v, str)]
        return await call(
            self.app, method, path, headers=headers, body=orjson.dumps(body) if body is not None else b"",
            query=query, client=_peer(context.peer()),
        )  # fmt: skip

    async def json(
        self, context: grpc.aio.ServicerContext, method: str, path: str, body: Any = None, query: str = ""
    ) -> dict[str, Any]:
        exchange = await self._open(context, method, path, body, query)
        try:
            payload = await exchange.body()
        finally:
            await exchange.close()
        if exchange.status >= 400:
            await _abort(context, exchange, payload)
        result: dict[str, Any] = orjson.loads(payload) if payload else {}
        return result

    async def events(
        self, context: grpc.aio.ServicerContext, method: str, path: str, body: Any = None, query: str = ""
    ) -> AsyncIterator[SseEvent]:
        """The SSE events of a streamed answer; an error event ends the RPC with its status."""
        exchange = await self._open(context, method, path, body, query)
        try:
            if exchange.status >= 400:
                await _abort(context, exchange, await exchange.body())
            buffer = b""
            async for chunk in exchange.chunks:
                buffer += chunk
                while b"\n\n" in buffer:
                    raw, buffer = buffer.split(b"\n\n", 1)
                    event = _parse(raw)
                    if event is None:
                        continue
                    if event.event == "error" or ("error" in event.data and len(event.data) == 1):
                        await _abort_event(context, event.data)
                    yield event
        finally:
            await exchange.close()


def _parse(raw: bytes) -> SseEvent | None:
    ident = name = None
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"id":
            ident = value.decode()
        elif field == b"event":
            name = value.decode()
        elif field == b"data":
            data.append(value)
    if not data or data == [b"[DONE]"]:
        return None
    return SseEvent(ident, name, orjson.loads(b"\n".join(data)))


async def _abort(context: grpc.aio.ServicerContext, exchange: Exchange, payload: bytes) -> None:
    try:
        error = orjson.loads(payload).get("error", {})
    except (orjson.JSONDecodeError, AttributeError):
        error = {"message": payload.decode(errors="replace")[:500]}
    trailers: list[tuple[str, str | bytes]] = [(ERROR_TRAILER, payload)]
    if retry := exchange.headers.get("retry-after"):
        trailers.append(("retry-after", retry))
    if request_id := exchange.headers.get("x-request-id"):
        trailers.append(("x-request-id", request_id))
    context.set_trailing_metadata(tuple(trailers))
    await context.abort(grpc_status(exchange.status), str(error.get("message") or f"HTTP {exchange.status}"))


async def _abort_event(context: grpc.aio.ServicerContext, data: dict[str, Any]) -> None:
    error = data.get("error") if isinstance(data.get("error"), dict) else data
    code = str(error.get("code") or "")
    retryable = code in ("server_shutting_down", "backend_error")
    status = grpc.StatusCode.UNAVAILABLE if retryable else grpc.StatusCode.INTERNAL
    context.set_trailing_metadata(((ERROR_TRAILER, orjson.dumps(data)),))
    await context.abort(status, str(error.get("message") or "the stream failed"))


def _peer(peer: str) -> tuple[str, int] | None:
    """grpc's peer string ("ipv4:127.0.0.1:5555", "ipv6:[::1]:5555") as an ASGI client address."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = rest.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None
