"""build_app(config): wire the layers together and own start-up and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from strata import __version__
from strata.agents.runtime import AgentRuntime
from strata.api import (
    admin_routes,
    agents_routes,
    audit_routes,
    completions_routes,
    embeddings_routes,
    health_routes,
    keys_routes,
    list_routes,
    mcp_routes,
    meta_routes,
    openai_routes,
    overview_routes,
    responses_routes,
    runs_routes,
    sessions_routes,
    trace_routes,
    usage_routes,
    ws_routes,
)
from strata.api.auth import AuthMiddleware, Guard, authorize
from strata.api.body_limit import BodyLimitMiddleware
from strata.api.chat_fast_path import ChatFastPath
from strata.api.errors import install_error_handlers
from strata.api.grpc_api.server import grpc_server
from strata.api.load_shedding import InFlight, InFlightLimit
from strata.api.metrics_middleware import MetricsMiddleware
from strata.api.model_sync import CHANNEL as MODELS_CHANNEL
from strata.api.model_sync import ModelSync, replica_name
from strata.api.openapi_docs import ERROR_RESPONSES
from strata.api.permissions import PROBE_PATHS, Policy, public_paths, route_policies
from strata.api.reload import reload_on_signal
from strata.api.request_id import RequestIdMiddleware
from strata.api.starting import StartingGate
from strata.api.state import AppState, Lifecycle
from strata.api.strings import refuse_bad_strings
from strata.api.tracing_middleware import TracingMiddleware
from strata.compute.offload import CpuPool
from strata.compute.tokens import PooledTokenCounter
from strata.config import StrataConfig
from strata.console import routes as console_routes
from strata.coordination import Signal, redis_client
from strata.cost.budgets import BudgetAlert
from strata.cost.gpu_time import GpuTimeShares
from strata.cost.services import CostServices
from strata.machine_state import MachineStateClient, SharedBreakerStore, SharedBudgetCounters, SharedCounters
from strata.observability.alerts import Alerter
from strata.observability.gpu_metrics import GpuCollector, GpuMonitor
from strata.observability.metric_series import MetricSeries
from strata.observability.request_metrics import RequestMetrics
from strata.observability.serving_metrics import ServingCollector
from strata.observability.tracing import Tracing
from strata.observability.upstream_metrics import UpstreamCollector
from strata.observability.writer_metrics import RejectedRowsCollector
from strata.resilience.breaker import BreakerStore, RedisBreakerStore
from strata.security.admin_key import ensure_admin_key
from strata.security.audit_checkpoint import Checkpointer, checkpoint_file
from strata.security.audit_log import AuditLog
from strata.security.authenticator import Authenticator
from strata.security.encryption import load_keyring
from strata.security.file_modes import private_data_dir
from strata.security.jwt_auth import JwtVerifier
from strata.security.rate_limit import RateLimiter
from strata.security.redaction import Redactor, upstream_key_envs
from strata.serving.chat import ChatService
from strata.serving.completions import CompletionService
from strata.serving.embeddings import EmbeddingService
from strata.serving.hotswap import ModelDeployer
from strata.serving.launched import LaunchedDeployment
from strata.serving.router import Router, build_router
from strata.startup import describe_failure
from strata.store.audit import AuditStore
from strata.store.database import Database
from strata.store.keys import KeyNotFound, KeyStore
from strata.store.model_versions import ModelVersionStore
from strata.workers import WorkerShare

log = structlog.get_logger("strata.app")
POOLED_COUNT_BYTES = 1 << 20


def build_app(
    config: StrataConfig,
    lifecycle: Lifecycle | None = None,
    config_path: Path | None = None,
    redactor: Redactor | None = None,
    share: WorkerShare | None = None,
) -> FastAPI:
    """`share`: what this process, one of `server.workers`, shares with the others (workers.py)."""
    # Deployments are built here, not in the lifespan, so a missing model fails before we listen.
    redis = redis_client(config.redis_url) if config.redis_url else None
    machine = MachineStateClient(share.state_path) if share is not None and share.state_path else None
    cpu = CpuPool(max_workers=config.compute.cpu_workers, max_queued=config.compute.max_queued_jobs)
    # Counting tokens of huge texts goes to the CPU pool; below the threshold a process hop costs more.
    counter = PooledTokenCounter(cpu, threshold_bytes=POOLED_COUNT_BYTES)
    breakers: BreakerStore | None = None
    if redis is not None:
        breakers = RedisBreakerStore(redis)
    elif machine is not None:
        breakers = SharedBreakerStore(machine)
    router = build_router(config, breakers, counter)
    if share is not None:  # the supervisor launched the model servers: attach to them
        for deployment in router.deployments:
            if isinstance(deployment, LaunchedDeployment) and deployment.name in share.endpoints:
                deployment.attach(share.endpoints[deployment.name])
    gpus = GpuMonitor()
    try:
        private_data_dir(config.data_dir)  # 0700, and what an older install left readable tightened to 0600
    except OSError as exc:  # a read-only root file system on PostgreSQL: nothing of Strata's is kept there
        log.warning("cannot create or tighten the data dir", path=str(config.data_dir), error=str(exc))
    keyring = load_keyring(config, os.environ)  # before listening: a bad key must stop the start
    # Credentials by shape and the configured secrets: masked in logs, error bodies and whatever is stored.
    redactor = redactor or Redactor.from_environ(
        config.security.redact_patterns, os.environ, upstream_key_envs(config.models)
    )
    tracing = Tracing.from_config(config.tracing, redactor=redactor)  # the app's own provider
    registry = _metrics_registry(router, gpus)
    gpu_time = GpuTimeShares()  # each request's share of its deployment's time: the basis of GPU-hour prices
    request_metrics = RequestMetrics(registry, is_known_model=lambda name: name in router.models)
    alerter = Alerter(config.alerts, registry)
    series = MetricSeries(registry)  # the console's charts: the last hour of this replica's request metrics

    def budget_alert(alert: BudgetAlert) -> None:
        alerter.fire_budget_alert(
            alert.budget.scope,
            alert.subject,
            spent_usd=alert.spent_usd,
            limit_usd=alert.budget.limit_usd,
            period=alert.budget.period,
            until=alert.resets_at.timestamp(),
            kind=alert.kind,
        )

    state = AppState(
        config=config,
        router=router,
        chat=ChatService(router, tracing, gpu_time),
        embeddings=EmbeddingService(router, tracing, gpu_time),
        completions=CompletionService(router, tracing, gpu_time),
        started_at=time.time(),
        deployer=ModelDeployer(router, drain_grace_s=config.server.shutdown_grace_s),
        metrics=registry,
        gpus=gpus,
        lifecycle=lifecycle or Lifecycle(),
        config_path=config_path,
        request_metrics=request_metrics,
        alerter=alerter,
        series=series,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The router first: a launched model server (the embedded llama.cpp) loads while the rest starts.
        state.lifecycle.step("launching the model servers")
        await router.start()
        try:
            await cpu.start()
        except BaseException:  # cancelled too: stopped while starting (`listening_lifespan`)
            await router.stop(grace_s=5.0)
            raise
        await gpus.start(config.compute.gpu_poll_interval_s)  # NVML reads run in a thread
        state.lifecycle.step("migrating the database and starting the agent runtime")
        try:
            state.runtime = await AgentRuntime.start(
                config, state.chat, cpu, keyring=keyring.keyring, redactor=redactor, migrate=share is None
            )
        except BaseException as exc:
            _log_start_failure("cannot start the agent runtime", exc)
            await router.stop(grace_s=5.0)
            await gpus.stop()
            await cpu.shutdown()
            raise
        await tracing.start(state.runtime.db)  # the local trace store's writer
        state.sync = ModelSync(
            state,
            ModelVersionStore(state.runtime.db),
            Signal(redis, MODELS_CHANNEL),
            interval_s=config.deploy.sync_interval_s,
            replica=replica_name(config.server.port),
        )
        await state.sync.start()  # converges on the cluster's model versions in the background
        if keyring.created_file is not None:
            log.warning("created an encryption key file: back it up, stored data cannot be read without it",
                        path=str(keyring.created_file))  # fmt: skip
        for warning in keyring.warnings:
            log.warning(warning)
        state.lifecycle.step("starting the security layer and cost services")
        try:
            state.guard = await _start_guard(config, state.runtime.db, redis, policies, request_metrics, machine)
            state.cost = await CostServices.start(
                config, state.runtime.db, redis=redis, on_soft_limit=budget_alert, on_hard_limit=budget_alert,
                gpu_time=gpu_time, counters=SharedBudgetCounters(machine) if machine is not None else None,
            )  # fmt: skip
            state.runtime.engine.accounting.bind(state.cost, request_metrics, _key_budget(state.guard.auth.keys))
            await alerter.start()
            await series.start()
        except BaseException as exc:
            _log_start_failure("cannot start the security layer", exc)
            await state.sync.stop()
            await state.runtime.stop()
            await state.runtime.close()
            await router.stop(grace_s=5.0)
            await gpus.stop()
            await cpu.shutdown()
            raise
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[Any]] = set()  # referenced until done, so none is collected midway

        def on_sighup() -> None:
            task = asyncio.create_task(reload_on_signal(state))
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
            await state.guard.auth.stop()
            await state.guard.limiter.aclose()
            await state.sync.stop()  # before the runtime: it may be mid-deploy; its rows leave the listing
            await state.lifecycle.stop_background()  # unfinished background responses are marked failed
            await state.runtime.stop()
            await state.deployer.wait_drained()
            await router.stop(grace_s=10.0)
            await tracing.shutdown()  # after everything that makes spans; flushes the exporters and the store
            await gpus.stop()
            await cpu.shutdown()
            await alerter.stop()
            await series.stop()
            await state.cost.stop()  # after everything that may spend; flushes the usage rows
            await state.guard.audit.stop()  # after everything that may record; flushes: nothing is lost
            await state.runtime.close()
            if redis is not None:
                await redis.aclose()
            if machine is not None:
                await machine.aclose()
            log.info("strata stopped")

    @asynccontextmanager
    async def listening_lifespan(app: FastAPI) -> AsyncIterator[None]:
        """uvicorn listens only once the lifespan's start-up returns: the slow work runs after that, in a task,
        while /healthz and /readyz answer and other requests get 503 (api/starting.py)."""
        stack = AsyncExitStack()

        async def start() -> None:
            try:
                await stack.enter_async_context(lifespan(app))
                await stack.enter_async_context(grpc_server(app, config.server, config.limits.max_body_bytes))
            except Exception as exc:  # `strata serve` says this in one line and exits; the traceback is for debug
                log.debug("start-up failed", exc_info=True)
                state.lifecycle.failed(describe_failure(exc))
            else:
                state.lifecycle.started()

        starting = asyncio.create_task(start(), name="start-up")
        try:
            yield
        finally:
            starting.cancel()  # stopped while starting: what the start launched so far is stopped (its except blocks)
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await stack.aclose()

    # FastAPI's own /docs and /openapi.json would answer without credentials: meta_routes serves the schema.
    app = FastAPI(
        title="Strata",
        version=__version__,
        lifespan=listening_lifespan,
        dependencies=[Depends(authorize), Depends(refuse_bad_strings)],
        responses=ERROR_RESPONSES,
        # Strata traces and measures requests itself (observability/); FastAPI's own telemetry would only
        # re-check OTel's global providers (an os.environ read) on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.strata = state
    registry.register(RejectedRowsCollector(lambda: _rejected_rows(state, tracing)))
    app.include_router(health_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(embeddings_routes.router)
    app.include_router(completions_routes.router)
    for routes in (runs_routes, sessions_routes, agents_routes, ws_routes, admin_routes, keys_routes, audit_routes):
        app.include_router(routes.router)
    for routes in (usage_routes, trace_routes, mcp_routes, list_routes, overview_routes):
        app.include_router(routes.router)
    app.include_router(console_routes.router)
    app.include_router(console_routes.docs_router)
    app.include_router(admin_routes.metrics_router)
    app.include_router(meta_routes.router)
    policies = route_policies(app, public_metrics=config.security.public_metrics)  # undeclared route: no start
    install_error_handlers(app, redactor)
    app.add_middleware(ChatFastPath)  # inside authentication: the route's own permission check runs in it
    app.add_middleware(AuthMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=request_metrics)  # outside auth: 401, 413 and 429 count too
    if tracing.enabled:  # the request's span wraps authentication: refusals are traced too
        app.add_middleware(TracingMiddleware, tracing=tracing)
    app.add_middleware(StartingGate, lifecycle=state.lifecycle)  # 503 but for the probes until started
    app.add_middleware(RequestIdMiddleware)  # even a 401 or a 413 carries the request id
    if config.server.max_in_flight is not None:  # outermost: shedding must cost next to nothing
        state.in_flight = InFlight(config.server.max_in_flight, PROBE_PATHS, request_metrics)
        app.add_middleware(InFlightLimit, in_flight=state.in_flight)
    return app


def _log_start_failure(what: str, exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError):
        log.info("stopped while starting; undoing the start", step=what.removeprefix("cannot start "))
    else:
        log.error(what, error=str(exc))


async def _start_guard(
    config: StrataConfig,
    db: Database,
    redis: Redis | None,
    policies: dict[Any, Policy],
    metrics: RequestMetrics,
    machine: MachineStateClient | None,
) -> Guard:
    store = AuditStore(db)
    checkpoints = Checkpointer(store, checkpoint_file(config), config.security.audit.checkpoint_interval_s)
    audit = AuditLog(store, checkpointer=checkpoints)  # signs the chain's head at start, periodically and at stop
    await audit.start()
    jwt = JwtVerifier(config.security.jwt) if config.security.jwt is not None else None
    auth = Authenticator(KeyStore(db), ttl_s=config.security.key_cache_ttl_s, jwt=jwt, redis=redis)
    await auth.start()
    await ensure_admin_key(auth.keys, audit, os.environ, announce_admin_key)
    return Guard(
        auth=auth,
        limiter=RateLimiter(config.redis_url, shared=SharedCounters(machine) if machine is not None else None),
        audit=audit,
        public_paths=public_paths(config.security.public_metrics),
        policies=policies,
        default_rpm=config.limits.default_rpm,
        default_tpm=config.limits.default_tpm,
        metrics=metrics,
    )


def _key_budget(keys: KeyStore) -> Callable[[str], Awaitable[float | None]]:
    async def budget(key_id: str) -> float | None:
        try:
            return (await keys.get(key_id)).budget_usd
        except KeyNotFound:
            return None

    return budget


def announce_admin_key(secret: str) -> None:
    """Shown once, on the terminal (stderr), never through the logger."""
    sys.stderr.write(
        "\n" + "=" * 78 + "\n"
        "  Strata created the first admin API key. It is shown this once; store it now:\n\n"
        f"    {secret}\n\n"
        "  Use it as the bearer token (OPENAI_API_KEY for the openai client). Lost it? Run\n"
        "  `strata keys create --name me --role admin` on this machine for a new one.\n" + "=" * 78 + "\n\n"
    )
    sys.stderr.flush()


def _rejected_rows(state: AppState, tracing: Tracing) -> dict[str, int]:
    counts = {"spans": tracing.spans_rejected}
    if state.cost is not None:
        counts["usage"] = state.cost.meter.rejected
    if state.guard is not None:
        counts["audit"] = state.guard.audit.rejected
    return counts


def _metrics_registry(router: Router, gpus: GpuMonitor) -> CollectorRegistry:
    """One registry per app (never the process-global one), so several apps in a process stay apart."""
    registry = CollectorRegistry()
    registry.register(ServingCollector(router))
    registry.register(UpstreamCollector(router))
    registry.register(GpuCollector(lambda: gpus.latest))
    return registry
