"""build_app(config): wire the layers together and own start-up and shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from strata import __version__
from strata.agents.runtime import AgentRuntime
from strata.api import (
    admin_routes,
    agents_routes,
    health_routes,
    openai_routes,
    runs_routes,
    sessions_routes,
    ws_routes,
)
from strata.api.errors import install_error_handlers
from strata.api.reload import reload_config
from strata.api.request_id import RequestIdMiddleware
from strata.api.state import AppState, Lifecycle
from strata.compute.offload import CpuPool
from strata.compute.tokens import PooledTokenCounter
from strata.config import StrataConfig
from strata.observability.gpu_metrics import GpuCollector, GpuMonitor
from strata.observability.serving_metrics import ServingCollector
from strata.observability.upstream_metrics import UpstreamCollector
from strata.resilience.breaker import RedisBreakerStore
from strata.serving.chat import ChatService
from strata.serving.hotswap import ModelDeployer
from strata.serving.router import Router, build_router

log = structlog.get_logger("strata.app")
POOLED_COUNT_BYTES = 1 << 20


def build_app(config: StrataConfig, lifecycle: Lifecycle | None = None, config_path: Path | None = None) -> FastAPI:
    # Deployments are built here, not in the lifespan, so a missing model fails before we listen.
    redis = Redis.from_url(config.redis_url) if config.redis_url else None
    cpu = CpuPool(max_workers=config.compute.cpu_workers, max_queued=config.compute.max_queued_jobs)
    # Counting tokens of huge texts goes to the CPU pool; below the threshold a process hop costs more.
    counter = PooledTokenCounter(cpu, threshold_bytes=POOLED_COUNT_BYTES)
    router = build_router(config, RedisBreakerStore(redis) if redis is not None else None, counter)
    gpus = GpuMonitor()
    state = AppState(
        config=config,
        router=router,
        chat=ChatService(router),
        started_at=time.time(),
        deployer=ModelDeployer(router, drain_grace_s=config.server.shutdown_grace_s),
        metrics=_metrics_registry(router, gpus),
        gpus=gpus,
        lifecycle=lifecycle or Lifecycle(),
        config_path=config_path,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await cpu.start()
        await router.start()
        await gpus.start(config.compute.gpu_poll_interval_s)  # NVML reads run in a thread
        try:
            state.runtime = await AgentRuntime.start(config, state.chat, cpu)
        except Exception as exc:
            log.error("cannot start the agent runtime", error=str(exc))
            await router.stop(grace_s=5.0)
            await gpus.stop()
            await cpu.shutdown()
            raise
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[Any]] = set()  # referenced until done, so none is collected midway

        def on_sighup() -> None:
            task = asyncio.create_task(reload_config(state))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        log.info(
            "strata started",
            models=[info.model for info in router.infos()],
            agents=[agent.name for agent in config.agents],
            database=state.runtime.db.url.render_as_string(hide_password=True),
        )
        try:
            yield
        finally:
            state.lifecycle.draining = True
            loop.remove_signal_handler(signal.SIGHUP)
            await state.runtime.stop()
            await state.deployer.wait_drained()
            await router.stop(grace_s=10.0)
            await gpus.stop()
            await cpu.shutdown()
            if redis is not None:
                await redis.aclose()
            log.info("strata stopped")

    app = FastAPI(title="Strata", version=__version__, lifespan=lifespan)
    app.state.strata = state
    app.include_router(health_routes.router)
    app.include_router(openai_routes.router)
    for routes in (runs_routes, sessions_routes, agents_routes, ws_routes, admin_routes):
        app.include_router(routes.router)
    app.include_router(admin_routes.metrics_router)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    return app


def _metrics_registry(router: Router, gpus: GpuMonitor) -> CollectorRegistry:
    """One registry per app (never the process-global one), so several apps in a process stay apart."""
    registry = CollectorRegistry()
    registry.register(ServingCollector(router))
    registry.register(UpstreamCollector(router))
    registry.register(GpuCollector(lambda: gpus.latest))
    return registry
