"""Load shedding: a bound on the requests Strata works on at once; beyond it, an immediate 503.

Without a bound, a server offered more than it can do accepts everything, and every request's latency grows
until clients time out: nobody is served. With it, the requests within the bound keep their latency and the
rest are refused at once with `Retry-After`, which clients (the `openai` SDK included) honour.

A request counts from its arrival until its response starts: a non-streamed answer is then nearly done, and
a stream (chat SSE, run events) goes on relaying without holding a place, so long-lived streams never starve
short requests. Stream relays are bounded by each model's admission limit instead. Probes and scrapes are
never refused: a load balancer must see the server as alive while it sheds. The refusal is built once and
sent before authentication, parsing or logging: shedding has to cost next to nothing, or it only adds to the
overload it answers.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.observability.request_metrics import RequestMetrics

RETRY_AFTER_S = 1


def _refusal(limit: int) -> tuple[Message, Message]:
    body = orjson.dumps(
        {
            "error": {
                "message": f"Strata is at its limit of {limit} requests in progress (server.max_in_flight); "
                f"retry in {RETRY_AFTER_S} s",
                "type": "server_error",
                "param": None,
                "code": "overloaded",
            }
        }
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    start: Message = {"type": "http.response.start", "status": 503, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


class InFlightLimit:
    """Pure ASGI, outside every other middleware of Strata's."""

    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[str], metrics: RequestMetrics) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.metrics = metrics
        self.in_flight = 0
        self._start, self._body = _refusal(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.metrics.shed()
            await send(self._start)
            await send(self._body)
            return
        self.in_flight += 1
        counted = True

        async def send_releasing(message: Message) -> None:
            nonlocal counted
            if counted and message["type"] == "http.response.start":
                counted = False
                self.in_flight -= 1
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            if counted:
                self.in_flight -= 1
