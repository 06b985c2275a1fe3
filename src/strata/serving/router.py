"""Model name -> deployment, plus the health loop that keeps each deployment's state current."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from pathlib import Path

import structlog

from strata.config import EmbeddedModelConfig, StrataConfig
from strata.serving.deployment import Deployment, DeploymentInfo, RemoteDeployment
from strata.serving.embedded import EmbeddedDeployment
from strata.serving.errors import ModelNotFoundError

log = structlog.get_logger("strata.router")


def build_deployments(config: StrataConfig) -> list[Deployment]:
    deployments: list[Deployment] = []
    for model in config.models:
        if isinstance(model, EmbeddedModelConfig):
            deployments.append(EmbeddedDeployment(model, Path(config.data_dir)))
        else:
            deployments.append(RemoteDeployment(model))
    return deployments


class Router:
    def __init__(self, deployments: Iterable[Deployment], health_interval_s: float) -> None:
        self._by_model = {d.model: d for d in deployments}
        self._health_interval_s = health_interval_s
        self._health_task: asyncio.Task[None] | None = None

    def resolve(self, model: str) -> Deployment:
        deployment = self._by_model.get(model)
        if deployment is None:
            available = ", ".join(sorted(self._by_model))
            raise ModelNotFoundError(f"The model {model!r} does not exist. Available models: {available}")
        return deployment

    @property
    def models(self) -> list[str]:
        return list(self._by_model)

    def infos(self) -> list[DeploymentInfo]:
        return [d.info() for d in self._by_model.values()]

    def any_healthy(self) -> bool:
        return any(d.healthy for d in self._by_model.values())

    async def start(self) -> None:
        for deployment in self._by_model.values():
            await deployment.start()
        self._health_task = asyncio.create_task(self._health_loop(), name="health-probes")

    async def stop(self, grace_s: float) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(d.stop(grace_s) for d in self._by_model.values()), return_exceptions=True)

    async def _health_loop(self) -> None:
        last: dict[str, bool] = {}
        while True:
            deployments = list(self._by_model.values())
            results = await asyncio.gather(*(d.probe() for d in deployments))
            for deployment, healthy in zip(deployments, results, strict=True):
                if last.get(deployment.model) != healthy:
                    last[deployment.model] = healthy
                    log.info(
                        "deployment health",
                        model=deployment.model,
                        deployment=deployment.client.deployment,
                        healthy=healthy,
                        state=deployment.state,
                    )
            await asyncio.sleep(self._health_interval_s)
