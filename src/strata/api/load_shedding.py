"""Load shedding: a bound on the requests Strata works on at once; beyond it, an immediate 503.

Without a bound, a server offered more than it can do accepts everything, and every request's latency grows
until clients time out: nobody is served. With it, the requests within the bound keep their latency and the
rest are refused at once with `Retry-After`, which clients (the `openai` SDK included) honour.

A request counts from its arrival until its response starts: a non-streamed answer is then nearly done, and
a stream (chat SSE, run events) goes on relaying without holding a place, so long-lived streams never starve
short requests. Stream relays are bounded by each model's admission limit instead. A route that is about to
wait long before it answers (a synchronous agent run waits for the run to end) calls `release_slot` first:
waiting is not work, and a few hundred waiting clients must not lock out the one who wants to cancel.

Probes and scrapes are never refused: a load balancer must see the server as alive while it sheds. The
refusal is prepared once (only its request id changes) and sent before authentication, parsing or logging:
shedding has to cost next to nothing, or it only adds to the overload it answers.
"""

from __future__ import annotations

import uuid

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.observability.request_metrics import RequestMetrics

RETRY_AFTER_S = 1
SLOT = "strata.in_flight_slot"


def release_slot(scope: Scope) -> None:
    """Stop counting this request as in progress (before a long wait); later calls do nothing."""
    release = scope.get(SLOT)
    if release is not None:
        release()


def _refusal(limit: int) -> tuple[bytes, bytes]:
    """The refusal's body, split around its request id: the only part that differs between refusals."""
    message = (
        f"Strata is at its limit of {limit} requests in progress (server.max_in_flight); retry in {RETRY_AFTER_S} s"
    )
    error = {"message": message, "type": "server_error", "param": None, "code": "overloaded", "request_id": "-"}
    head, tail = orjson.dumps({"error": error}).split(b'"-"')
    return head, tail


class InFlight:
    """The requests in progress against the bound, shared by the two places that refuse: `InFlightLimit` (the
    outermost ASGI middleware) and the connection's protocol (`api/connections.py`), which answers a request
    that arrived whole while the bound is reached before HTTP parsing and the ASGI call even start."""

    def __init__(self, limit: int, exempt: frozenset[str], metrics: RequestMetrics) -> None:
        self.limit = limit
        self.exempt = exempt
        self.metrics = metrics
        self.count = 0
        self._head, self._tail = _refusal(limit)

    @property
    def full(self) -> bool:
        return self.count >= self.limit

    def refusal(self) -> tuple[bytes, bytes]:
        """(body, request id) of one refusal, counted as shed."""
        self.metrics.shed()
        request_id = uuid.uuid4().hex.encode()
        return b'%s"%s"%s' % (self._head, request_id, self._tail), request_id

    def raw_refusal(self, close: bool) -> bytes:
        """The whole HTTP/1.1 response, for the protocol to write."""
        body, request_id = self.refusal()
        return (
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"retry-after: %d\r\nx-request-id: %s\r\n%s\r\n%s"
            % (len(body), RETRY_AFTER_S, request_id, b"connection: close\r\n" if close else b"", body)
        )


class InFlightLimit:
    """Pure ASGI, outside every other middleware of Strata's."""

    def __init__(self, app: ASGIApp, in_flight: InFlight) -> None:
        self.app = app
        self.state = in_flight
        self.exempt = in_flight.exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        state = self.state
        if state.count >= state.limit:
            await self._refuse(send)
            return
        state.count += 1
        counted = True

        def release() -> None:
            nonlocal counted
            if counted:
                counted = False
                state.count -= 1

        async def send_releasing(message: Message) -> None:
            if counted and message["type"] == "http.response.start":
                release()
            await send(message)

        scope[SLOT] = release
        try:
            await self.app(scope, receive, send_releasing)
        finally:
            release()

    async def _refuse(self, send: Send) -> None:
        # Answered before the request-id middleware runs: the refusal carries an id of its own, like every error.
        body, request_id = self.state.refusal()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
            (b"x-request-id", request_id),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
