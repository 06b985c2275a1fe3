"""What the routes need from the running app, as one typed object on `app.state.strata`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from strata.agents.runtime import AgentRuntime
from strata.agents.service import AgentService
from strata.api.auth import Guard
from strata.config import StrataConfig
from strata.cost.services import CostServices
from strata.observability.alerts import Alerter
from strata.observability.gpu_metrics import GpuMonitor
from strata.observability.metric_series import MetricSeries
from strata.observability.request_metrics import RequestMetrics
from strata.serving.chat import ChatService
from strata.serving.completions import CompletionService
from strata.serving.embeddings import EmbeddingService
from strata.serving.errors import BackendNotReadyError, ServerShuttingDownError
from strata.serving.hotswap import ModelDeployer
from strata.serving.router import Router
from strata.serving.stream_relay import ChatStreamRelay

if TYPE_CHECKING:
    from strata.api.load_shedding import InFlight
    from strata.api.model_sync import ModelSync


@dataclass
class Lifecycle:
    """Where the server is between listening and stopping, for /readyz and for the server runner.

    The slow start-up work (migrations, tool servers, the security layer) runs after the socket listens:
    `starting` says what it is doing now and is None once it is done; `settled` is set when it ends, done or
    failed (then `startup_error` says why). `draining` is set when shutdown begins, so /readyz can tell load
    balancers to go away.

    `streams` are the chat streams being relayed now; when the shutdown grace runs out, the runner ends
    them with an error event (`cut_streams`) rather than letting the server cancel them mid-write.
    """

    draining: bool = False
    starting: str | None = "starting"
    startup_error: str | None = None  # why the lifespan's start-up failed, for the one line `strata serve` prints
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    streams: set[ChatStreamRelay] = field(default_factory=set)
    # Work that outlives its request (Responses `background: true`): cancelled at shutdown, which marks it failed.
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def step(self, doing: str) -> None:
        """Say what the start-up does now (shown by /readyz)."""
        self.starting = doing

    def started(self) -> None:
        self.starting = None
        self.settled.set()

    def failed(self, reason: str) -> None:
        self.startup_error = reason
        self.settled.set()

    def cut_streams(self) -> int:
        """End every open stream with a `server_shutting_down` error event; returns how many there were."""
        error = ServerShuttingDownError("Strata is shutting down and its grace period ended; retry the request")
        streams = list(self.streams)
        for relay in streams:
            relay.interrupt(error)
        return len(streams)

    async def stop_background(self) -> None:
        tasks = list(self.background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class AppState:
    config: StrataConfig
    router: Router
    chat: ChatService
    embeddings: EmbeddingService
    completions: CompletionService
    started_at: float
    deployer: ModelDeployer
    metrics: CollectorRegistry
    gpus: GpuMonitor
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    config_path: Path | None = None  # what `POST /admin/reload` and SIGHUP re-read
    runtime: AgentRuntime | None = None  # set once the store is migrated and tools are connected
    guard: Guard | None = None  # authentication, limits and audit; set in the lifespan, before serving
    cost: CostServices | None = None  # prices, usage metering, budgets; set in the lifespan
    request_metrics: RequestMetrics | None = None
    alerter: Alerter | None = None
    sync: ModelSync | None = None  # cluster-wide deploys and reloads; set once the store is migrated
    series: MetricSeries | None = None  # the last hour of request metrics, for the console's charts
    in_flight: InFlight | None = None  # server.max_in_flight's count (api/load_shedding.py); None: no bound

    def model_sync(self) -> ModelSync:
        if self.sync is None:
            raise BackendNotReadyError("Strata is starting; try again shortly")
        return self.sync

    def agent_runtime(self) -> AgentRuntime:
        if self.runtime is None:
            raise BackendNotReadyError("the agent runtime is starting; try again shortly")
        return self.runtime

    def agent_service(self) -> AgentService:
        return self.agent_runtime().service
