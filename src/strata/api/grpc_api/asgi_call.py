"""One HTTP request to Strata's own ASGI app, in process, with its response streamed back.

The gRPC API is a second protocol for the same routes, not a second implementation: each RPC becomes the REST
request it stands for and goes through the whole middleware stack (authentication, roles, rate limits, body
limits, load shedding, request ids, tracing, metrics) and the route itself (validation, budgets, audit). So
both protocols give the same answers and refusals by construction. No library bridges gRPC to ASGI in process
(httpx's ASGI transport buffers whole responses, which would defeat streaming), hence these few lines.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message


@dataclass
class Exchange:
    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]  # the body as the app sends it
    _task: asyncio.Task[None]
    _disconnected: asyncio.Event

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks])

    async def close(self) -> None:
        """The caller went away: the app sees a disconnect (a stream stops its backend work), then ends."""
        self._disconnected.set()
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


async def call(
    app: ASGIApp,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]],
    body: bytes = b"",
    query: str = "",
    client: tuple[str, int] | None = None,
) -> Exchange:
    messages: asyncio.Queue[Message | BaseException] = asyncio.Queue()
    disconnected = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "2",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": client,
        "server": ("grpc", 0),
        "state": {},
        "extensions": {},
    }

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except BaseException as exc:  # handed to the reader, which raises it
            await messages.put(exc)
            raise

    task = asyncio.create_task(run())
    try:
        start = await messages.get()
    except asyncio.CancelledError:  # the caller left before the answer began: so does the request
        disconnected.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
    if isinstance(start, BaseException):
        raise start
    status = int(start["status"])
    response_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])}

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            message = await messages.get()
            if isinstance(message, BaseException):
                raise message
            if message["type"] != "http.response.body":
                continue
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return

    return Exchange(status, response_headers, chunks(), task, disconnected)
