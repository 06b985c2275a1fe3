"""Run the app under uvicorn: listening before the slow start-up, and a shutdown that drains before it stops.

The socket accepts connections as soon as the app's start-up has begun (it runs on in the background:
`app.py`, `api/starting.py`); `Announcer.listening` is told then, `Announcer.ready` once /readyz would answer
200. A start-up that fails after that stops the server, and `run_server` exits with STARTUP_FAILED.

On SIGTERM: /readyz turns 503 at once while Strata keeps serving for `drain_delay_s` (load
balancers notice and stop sending), then the listener closes, in-flight requests get
`shutdown_grace_s` to finish, and only then are child processes stopped. SIGINT (Ctrl-C at a
terminal) skips the drain delay; a second signal exits at once.

Chat streams still open when the grace ends are ended by Strata with an SSE error event (clients see why
their answer stops; each is logged once); only what is left `STREAM_CUT_S` later is cancelled by uvicorn.

Connections are bounded in number and in how long a request may take to arrive (`api/connections.py`);
a WebSocket message, like a request body, may be at most `limits.max_body_bytes`.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import structlog
import uvicorn
from fastapi import FastAPI

from strata.api.connections import (
    ConnectionCollector,
    ConnectionGuard,
    connection_bound,
    guarded_protocol,
    raise_descriptor_limit,
)
from strata.api.permissions import PROBE_PATHS
from strata.api.state import AppState, Lifecycle
from strata.config import ServerConfig
from strata.startup import STARTUP_FAILED

log = structlog.get_logger("strata.server")
# After the grace: time for cut streams to send their error event and end, before uvicorn cancels what is left.
STREAM_CUT_S = 1.0
READY_POLL_S = 0.1  # how often the "ready" announcement checks /readyz's condition, until it holds once


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        lifecycle: Lifecycle,
        drain_delay_s: float,
        shutdown_grace_s: float,
        announce: Announcer | None = None,
        listen_when_started: bool = False,
    ) -> None:
        super().__init__(config)
        self._listen_when_started = listen_when_started
        self._lifecycle = lifecycle
        self._drain_delay_s = drain_delay_s
        self._shutdown_grace_s = shutdown_grace_s
        self._announce = announce
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settling: asyncio.Task[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        if self._listen_when_started:
            # One of several workers on the port (workers.py): it joins the port only once it can serve, so the
            # others answer meanwhile rather than it saying "starting" to its share of the connections.
            lifespan_startup = self.lifespan.startup

            async def started() -> None:
                await lifespan_startup()
                await self._lifecycle.settled.wait()

            self.lifespan.startup = started  # type: ignore[method-assign]
        await super().startup(sockets)  # the app's start-up has begun (app.py), and the socket listens now
        if self.should_exit:
            return
        if self._announce is not None:
            self._announce.listening()
        self._settling = asyncio.create_task(self._settle(), name="until-ready")

    async def _settle(self) -> None:
        """Once the app's start-up is done: freeze what it made, then say when Strata is ready; or stop the
        server if the start-up failed (`run_server` then exits non-zero)."""
        await self._lifecycle.settled.wait()
        if self._lifecycle.startup_error is not None:
            self.should_exit = True
            return
        # The modules, configuration, routes and pools made at start-up live as long as the process. Left in
        # the collector's oldest generation, each full collection walks all of them again: a pause of 100 ms
        # and more on a busy 2-core machine, which every request in flight waits out. Frozen, they are
        # never scanned again; what requests allocate is collected as before.
        gc.collect()  # what is garbage already goes first: frozen objects are never collected
        gc.freeze()
        if self._announce is not None:
            while True:  # the health probes decide, on their own schedule; nothing to wait on but the state
                if self._announce.is_ready():
                    self._announce.ready()
                    return
                await asyncio.sleep(READY_POLL_S)

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        if self._settling is not None:
            self._settling.cancel()
        cut = asyncio.get_running_loop().call_later(self._shutdown_grace_s, self._cut_streams)
        try:
            await super().shutdown(sockets)  # waits up to the grace + STREAM_CUT_S, then cancels what is left
        finally:
            cut.cancel()

    def _cut_streams(self) -> None:
        if count := self._lifecycle.cut_streams():
            log.warning("shutdown grace ended; open streams end with an error event", streams=count,
                        grace_s=self._shutdown_grace_s)  # fmt: skip

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Replaces uvicorn's handler rather than extending it: uvicorn would re-raise the signal
        # after shutdown, so a drain that completed would still look like death by SIGTERM.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        first = not self._lifecycle.draining
        self._lifecycle.draining = True
        loop = self._loop
        if first and sig == signal.SIGTERM and self._drain_delay_s > 0 and loop is not None:

            def stop_after_delay() -> None:
                loop.call_later(self._drain_delay_s, setattr, self, "should_exit", True)

            # We are inside a signal handler: only the thread-safe call may touch the loop.
            loop.call_soon_threadsafe(stop_after_delay)
            return
        self.should_exit = True


# Background threads (the trace exporter encoding a batch, SQLite's writer threads) hold the GIL for up to
# Python's switch interval (5 ms by default) whenever the event loop wants it back: every request then waits
# behind them. A short interval bounds that wait; the cost is a few more thread switches under contention.
GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class Announcer:
    """What `strata serve` tells its operator: when the socket accepts connections, and when Strata is ready."""

    listening: Callable[[], None]
    ready: Callable[[], None]
    is_ready: Callable[[], bool]


def run_server(
    app: FastAPI,
    server: ServerConfig,
    lifecycle: Lifecycle,
    max_body_bytes: int,
    announce: Announcer | None = None,
    sockets: list[socket.socket] | None = None,
    listen_when_started: bool = False,
) -> None:
    """Serve until stopped; raises SystemExit(STARTUP_FAILED) if the app's start-up failed after listening.
    `sockets`: listen on these (a worker's SO_REUSEPORT socket, workers.py) instead of binding host:port;
    `listen_when_started`: only once the app's start-up is done (a worker the others cover for meanwhile)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    descriptors = raise_descriptor_limit()
    bound = connection_bound(server.max_connections, descriptors)
    if bound < server.max_connections:
        log.warning("server.max_connections lowered to stay below the descriptor limit",
                    max_connections=server.max_connections, bound=bound, descriptor_limit=descriptors)  # fmt: skip
    state: AppState = app.state.strata
    guard = ConnectionGuard(bound, server.header_timeout_s, server.body_timeout_s, PROBE_PATHS, shed=state.in_flight)
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=guarded_protocol(guard),
        ws_max_size=max_body_bytes,  # one bound for a request body and a WebSocket message
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=server.shutdown_grace_s + STREAM_CUT_S,  # type: ignore[arg-type]
        timeout_keep_alive=30,
        backlog=4096,
        ssl_certfile=str(server.tls_cert_file) if server.tls_cert_file else None,
        ssl_keyfile=str(server.tls_key_file) if server.tls_key_file else None,
    )
    runner = DrainingServer(
        config, lifecycle, server.drain_delay_s, server.shutdown_grace_s, announce, listen_when_started
    )
    state.metrics.register(ConnectionCollector(guard, lambda: len(runner.server_state.connections)))
    runner.run(sockets)
    if lifecycle.startup_error is not None:
        raise SystemExit(STARTUP_FAILED)
