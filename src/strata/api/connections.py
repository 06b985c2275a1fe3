"""Bounds on connections: how many may be open, and how long a client may take to send its request.

uvicorn closes idle keep-alive connections and nothing else. A client that opens connections and never
finishes a request head, trickles it a byte at a time (slowloris), or sends a chunked body that never ends
holds a file descriptor each for as long as it likes; enough of them and the process cannot accept another
connection: /healthz and every client fail together.

`GuardedProtocol` is uvicorn's httptools protocol with these bounds:

* A new connection has `server.header_timeout_s` to send a complete request head (a later request on a
  kept-alive connection, from its first byte); a request has `server.body_timeout_s` from its head to send
  its whole body. Past either, 408 and the connection is closed.
* At `server.max_connections` open connections (HTTP and WebSocket), a new one closes the connection that
  has waited longest without a request in progress (waiting for its head, or idle between requests): a flood
  of idle or half-open connections makes room for real clients out of its own connections. When every
  connection is busy with a request, a new one is answered 503 with Retry-After (probes are still served on
  it); past a small room for those refusals it is closed at once, which costs nothing.
* The bound stays below the process's descriptor limit, which is raised to its hard limit at start, with a
  reserve for the database, the backends, the logs and child processes.

A request that arrives whole in one read (nearly all of them) arms no timer of its own: the timers are armed
only once a read leaves a head or a body unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from strata.api.load_shedding import InFlight

RETRY_AFTER_S = 1
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*(?:\r\n|$)")
_CLOSE = re.compile(rb"\r\nconnection:[^\r]*close")
_NOT_SIMPLE = (b"\r\ntransfer-encoding:", b"\r\nexpect:", b"\r\nupgrade:")  # requests the fast refusal leaves alone
REFUSAL_ROOM = 64  # connections past the bound held until their head arrives, to answer 503; then closed at once
_RESERVE_MIN, _RESERVE_MAX = 128, 1024  # descriptors kept for everything but client connections
_UNLIMITED_TARGET = 1 << 20


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and target > soft:
        with contextlib.suppress(ValueError, OSError):  # a hard limit above the kernel's nr_open: keep what we have
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return _UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def connection_bound(configured: int, descriptor_limit: int) -> int:
    """`server.max_connections`, lowered to leave the reserve and the room for refusals within the limit."""
    reserve = min(_RESERVE_MAX, max(_RESERVE_MIN, descriptor_limit // 8))
    return max(1, min(configured, descriptor_limit - reserve - REFUSAL_ROOM))


@dataclass
class ConnectionGuard:
    """The bounds and the state shared by every connection of one server."""

    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    probe_paths: frozenset[str]
    # Connections with no request in progress, the longest-waiting first: the ones closed to make room.
    idle: OrderedDict[GuardedProtocol, None] = field(default_factory=OrderedDict)
    refusing: int = 0  # connections opened past the bound, held to answer 503
    shed: InFlight | None = None  # server.max_in_flight: full, a request that arrived whole is refused here
    closed: Counter[str] = field(default_factory=Counter)  # connections closed by the guard, by reason

    def make_room(self, connections: set[Any]) -> bool:
        """Close the connection idle longest; False when none is idle."""
        if not self.idle:
            return False
        victim, _ = self.idle.popitem(last=False)
        connections.discard(victim)  # out of the count now: its descriptor is freed as it closes
        victim.transport.close()
        self.closed["evicted"] += 1
        return True

    def timeout_response(self, part: str, timeout_s: float) -> bytes:
        request_id = uuid.uuid4().hex
        message = f"the request {part} did not arrive within {timeout_s:g} s (server.{part}_timeout_s)"
        body = _error_body(message, "invalid_request_error", "request_timeout", request_id)
        head = (
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"x-request-id: %s\r\nconnection: close\r\n\r\n" % (len(body), request_id.encode())
        )
        return head + body


def _error_body(message: str, type_: str, code: str, request_id: str) -> bytes:
    error = {"type": type_, "code": code, "message": message, "param": None, "request_id": request_id}
    return orjson.dumps({"error": error})


class Refusal:
    """The app of a connection opened past the bound while every connection was busy: probes are served,
    anything else is answered 503 with Retry-After, and the connection closes after its one answer."""

    def __init__(self, app: ASGIApp, guard: ConnectionGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in self.guard.probe_paths:
            await self.app(scope, receive, send)
            return
        self.guard.closed["refused"] += 1
        request_id = uuid.uuid4().hex
        message = (
            f"Strata has its limit of {self.guard.max_connections} connections open, all busy "
            f"(server.max_connections); retry in {RETRY_AFTER_S} s"
        )
        body = _error_body(message, "server_error", "too_many_connections", request_id)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded as the module says. Made per server by `guarded_protocol`."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # a request's first bytes came, its head is not complete
        self._in_body = False  # a request's head came, its body is not complete
        self._refusing = False
        self._dropped = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        if len(self.connections) >= guard.max_connections and not guard.make_room(self.connections):
            if guard.refusing >= REFUSAL_ROOM:
                self._dropped = True
                guard.closed["dropped"] += 1
                transport.abort()
                return
            self._refusing = True
            guard.refusing += 1
            self.app = Refusal(self.app, guard)
        super().connection_made(transport)
        if not self._refusing:
            guard.idle[self] = None
        self._head_timer = self.loop.call_later(guard.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(head=True, body=True)
        if self._dropped:
            return
        self.guard.idle.pop(self, None)
        if self._refusing:
            self._refusing = False
            self.guard.refusing -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        shed = self.guard.shed
        if shed is not None and shed.count >= shed.limit and self._shed(shed, data):
            return
        super().data_received(data)
        if self._in_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.guard.header_timeout_s, self._head_timed_out)
        elif not self._in_head and self._head_timer is not None:
            self._cancel(head=True)
        if self._in_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.guard.body_timeout_s, self._body_timed_out)
        elif not self._in_body and self._body_timer is not None:
            self._cancel(body=True)

    def _shed(self, shed: InFlight, data: bytes) -> bool:
        """At `server.max_in_flight`, refuse a request that came whole in this read, on a connection between
        requests, without parsing it into a scope, starting a task or calling the app: a refusal must cost next
        to nothing, or refusing at ten times the rate Strata can serve takes the CPU the admitted requests need.
        Anything else (a probe, a partial or pipelined request, chunked, Expect, Upgrade) takes the ordinary path,
        where `InFlightLimit` refuses it the same way."""
        if (
            self._in_head
            or self._in_body
            or self.pipeline
            or (self.cycle is not None and not self.cycle.response_complete)
        ):
            return False
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = data[:end].lower()
        line_end = head.find(b"\r\n")
        request_line = head[: line_end if line_end >= 0 else end].split(b" ")
        if len(request_line) != 3 or not request_line[2].startswith(b"http/1."):
            return False
        path = request_line[1].split(b"?", 1)[0].decode("latin-1")
        if path in shed.exempt or any(word in head for word in _NOT_SIMPLE):
            return False
        if head.count(b"\r\ncontent-length:") > 1:  # ambiguous framing: httptools decides (it refuses it)
            return False
        match = _CONTENT_LENGTH.search(head)
        length = int(match.group(1)) if match else 0
        if len(data) != end + 4 + length:  # the body is not all here, or another request follows: parse it
            return False
        self._unset_keepalive_if_required()
        self._cancel(head=True)
        close = request_line[2] == b"http/1.0" or _CLOSE.search(head) is not None
        self.transport.write(shed.raw_refusal(close))
        if close:
            self.transport.close()
        else:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
        return True

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.guard.idle.pop(self, None)  # a request is in progress: not a connection to close for room
        self._in_body = not (self.parser.should_upgrade() and self._should_upgrade())
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._refusing:  # a probe answered on a connection past the bound: it ends with its answer
            self.transport.close()
        elif not self._in_head and (self.cycle is None or self.cycle.response_complete):
            self.guard.idle[self] = None

    def _should_upgrade(self) -> bool:
        return not self._refusing and super()._should_upgrade()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        self.guard.closed["header_timeout"] += 1
        if self._in_head:  # part of a request came: say why it ends
            self.transport.write(self.guard.timeout_response("header", self.guard.header_timeout_s))
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        self.guard.closed["body_timeout"] += 1
        if not cycle.response_started:
            self.transport.write(self.guard.timeout_response("body", self.guard.body_timeout_s))
            cycle.disconnected = True  # the app reading the body sees the client gone; its answer is not sent
            cycle.message_event.set()
            self.transport.close()
        elif not cycle.response_complete:  # answered without the body: the answer goes on, then the connection ends
            cycle.keep_alive = False
            self.flow.pause_reading()
        else:
            self.transport.close()

    def _cancel(self, *, head: bool = False, body: bool = False) -> None:
        if head and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if body and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """The protocol class for one server (uvicorn makes its protocols from a class and its own config)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})


class ConnectionCollector(Collector):
    """Prometheus view of the connections, read at scrape time."""

    def __init__(self, guard: ConnectionGuard, open_count: Callable[[], int]) -> None:
        self._guard = guard
        self._open_count = open_count

    def collect(self) -> Iterator[Metric]:
        opened = GaugeMetricFamily("strata_connections_open", "Client connections open, HTTP and WebSocket.")
        opened.add_metric([], self._open_count())
        limit = GaugeMetricFamily("strata_connections_limit", "The bound on open connections in force.")
        limit.add_metric([], self._guard.max_connections)
        closed = CounterMetricFamily(
            "strata_connections_closed",
            "Connections Strata closed to protect itself: evicted (idle, to make room), refused (503, all busy), "
            "dropped (past the room for refusals), header_timeout, body_timeout.",
            labels=["reason"],
        )
        for reason in ("evicted", "refused", "dropped", "header_timeout", "body_timeout"):
            closed.add_metric([reason], self._guard.closed[reason])
        yield from (opened, limit, closed)
