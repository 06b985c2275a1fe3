"""Model names -> pools of deployments, route rules (virtual model names), and the health loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import structlog

from strata.config import (
    EmbeddedModelConfig,
    ModelConfig,
    RouteConfig,
    StrataConfig,
    TritonModelConfig,
    VllmModelConfig,
)
from strata.resilience.admission import AdmissionController
from strata.resilience.breaker import BreakerStore, CircuitBreaker, MemoryBreakerStore
from strata.resilience.retry import RetryBudget, RetryPolicy
from strata.security.egress import EgressPolicy
from strata.security.egress_resolver import EgressResolver
from strata.serving.deployment import WHAT, Deployment, DeploymentInfo, Guards, RemoteDeployment
from strata.serving.embedded import EmbeddedDeployment
from strata.serving.errors import ModelNotFoundError, RequestNotSupportedError
from strata.serving.faults import FaultClassifier
from strata.serving.pool import ModelPool
from strata.serving.triton import TritonDeployment
from strata.serving.usage import ApproximateTokenCounter, TokenCounter
from strata.serving.vllm import VllmDeployment

log = structlog.get_logger("strata.router")


class PoolFactory(Protocol):
    def __call__(self, model: ModelConfig, egress: EgressPolicy | None = None) -> ModelPool: ...


@dataclass(frozen=True)
class RoutingHints:
    """What route rules may look at: who asks (an agent), how it is tagged, how long the prompt is."""

    agent: str | None = None
    tag: str | None = None
    prompt_tokens: int = 0


def build_pool(
    config: ModelConfig,
    data_dir: Path,
    breakers: BreakerStore,
    counter: TokenCounter,
    egress: EgressPolicy | None = None,
) -> ModelPool:
    """`counter` estimates tokens where a backend reports no usage (the embedded model counts its own).
    `egress`: the policy every DNS answer for the endpoints must pass (endpoints given over the API)."""

    def guards(name: str) -> Guards:
        return Guards(AdmissionController.from_config(config.admission), CircuitBreaker(name, config.breaker, breakers))

    deployments: list[Deployment]
    if isinstance(config, EmbeddedModelConfig):
        deployments = [EmbeddedDeployment(config, data_dir, guards(f"{config.name}/embedded"))]
    elif isinstance(config, VllmModelConfig):
        deployments = [VllmDeployment(config, data_dir, guards(f"{config.name}/vllm"), counter)]
    elif isinstance(config, TritonModelConfig):
        deployments = [TritonDeployment(config, data_dir, guards(f"{config.name}/triton"), counter)]
    else:
        endpoints = config.endpoints()
        hosts = Counter(_host(e.base_url) for e in endpoints)
        resolver = EgressResolver(egress) if egress is not None else None
        deployments = []
        for index, endpoint in enumerate(endpoints):
            host = _host(endpoint.base_url)
            name = f"{config.name}/{host}" if hosts[host] == 1 else f"{config.name}/{host}#{index}"
            deployments.append(RemoteDeployment(config, endpoint, name, guards(name), counter, resolver))
    budget = RetryBudget.from_config(config.retry)
    return ModelPool(
        config.name,
        deployments,
        retry=RetryPolicy(config.retry, budget),
        budget=budget,
        fallbacks=list(config.fallbacks),
        total_timeout_s=config.timeouts.total_s,
        config=config,
        panic_threshold=config.breaker.panic_threshold,
        faults=FaultClassifier(config.retry.client_error_patterns),
    )


def _host(url: str) -> str:
    """host:port of a URL without any user:password@ (deployment names appear in errors and metrics)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def build_router(
    config: StrataConfig, breakers: BreakerStore | None = None, counter: TokenCounter | None = None
) -> Router:
    store = breakers or MemoryBreakerStore()
    tokens = counter or ApproximateTokenCounter()
    data_dir = Path(config.data_dir)
    pools = [build_pool(model, data_dir, store, tokens) for model in config.models]
    router = Router(pools, config.routes, health_interval_s=config.server.health_interval_s)
    router.factory = lambda model, egress=None: build_pool(model, data_dir, store, tokens, egress)
    return router


class Router:
    def __init__(self, pools: Iterable[ModelPool], routes: Iterable[RouteConfig], health_interval_s: float) -> None:
        self._pools = {pool.model: pool for pool in pools}
        self._routes = {route.name: route for route in routes}
        self._health_interval_s = health_interval_s
        self._health_task: asyncio.Task[None] | None = None
        #: Builds a pool for a model config (hot swap and reload build the new version with it).
        self.factory: PoolFactory | None = None

    def install(self, pool: ModelPool) -> ModelPool | None:
        """Put `pool` in service for its model; new requests go to it at once. Returns the one it replaced."""
        previous = self._pools.get(pool.model)
        self._pools[pool.model] = pool
        return previous

    def uninstall(self, model: str) -> ModelPool | None:
        return self._pools.pop(model, None)

    def set_routes(self, routes: Iterable[RouteConfig]) -> None:
        self._routes = {route.name: route for route in routes}

    def route(self, model: str, hints: RoutingHints | None = None) -> str:
        """The configured model that serves `model`: itself, or what its route's first matching rule says."""
        if model in self._pools:
            return model
        route = self._routes.get(model)
        if route is None:
            available = ", ".join(sorted([*self._pools, *self._routes]))
            raise ModelNotFoundError(f"The model {model!r} does not exist. Available models: {available}")
        hints = hints or RoutingHints()
        for rule in route.rules:
            if rule.agents and hints.agent not in rule.agents:
                continue
            if rule.tags and hints.tag not in rule.tags:
                continue
            if rule.max_prompt_tokens is not None and hints.prompt_tokens > rule.max_prompt_tokens:
                continue
            if rule.min_prompt_tokens is not None and hints.prompt_tokens < rule.min_prompt_tokens:
                continue
            return rule.model
        raise ModelNotFoundError(f"no rule of route {model!r} matches this request")

    def is_model(self, name: str) -> bool:
        return name in self._pools

    def pool(self, model: str) -> ModelPool:
        pool = self._pools.get(model)
        if pool is None:
            raise ModelNotFoundError(f"The model {model!r} does not exist")
        return pool

    def check_serves(self, model: str, path: str) -> None:
        """Refuse (400, naming `model`) a request for an endpoint the configured `model` is known not to answer:
        the embedded chat model has no embeddings, the embedded embedding model no chat."""
        served = self.pool(model).deployments[0].serves
        if path not in served:
            offers = " and ".join(WHAT[p] for p in sorted(served))
            wanted = WHAT[path]
            others = sorted(m for m, p in self._pools.items() if path in p.deployments[0].serves)
            hint = f"; models for {wanted}: {', '.join(others)}" if others else ""
            raise RequestNotSupportedError(
                f"model: {model!r} serves {offers}, not {wanted}{hint}", param="model", deployment=model
            )

    def resolve(self, model: str) -> Deployment:
        """A representative deployment of `model` (for what all its replicas share: kind, capabilities)."""
        return self.pool(self.route(model)).deployments[0]

    @property
    def models(self) -> list[str]:
        return [*self._pools, *self._routes]

    @property
    def deployments(self) -> list[Deployment]:
        return [d for pool in self._pools.values() for d in pool.deployments]

    def infos(self) -> list[DeploymentInfo]:
        return [d.info() for d in self.deployments]

    def any_healthy(self) -> bool:
        return any(d.healthy for d in self.deployments)

    async def start(self) -> None:
        for deployment in self.deployments:
            await deployment.start()
        self._health_task = asyncio.create_task(self._health_loop(), name="health-probes")

    async def stop(self, grace_s: float) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(d.stop(grace_s) for d in self.deployments), return_exceptions=True)

    async def _health_loop(self) -> None:
        last: dict[str, bool] = {}
        while True:
            deployments = self.deployments
            results = await asyncio.gather(*(d.probe() for d in deployments))
            for deployment, healthy in zip(deployments, results, strict=True):
                if last.get(deployment.name) != healthy:
                    last[deployment.name] = healthy
                    log.info(
                        "deployment health",
                        model=deployment.model,
                        deployment=deployment.name,
                        healthy=healthy,
                        state=deployment.state,
                    )
            await asyncio.sleep(self._health_interval_s)
