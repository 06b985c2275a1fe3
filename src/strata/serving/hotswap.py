"""Replace a model's deployments with a new version without failing a request.

Start the new deployments (launching servers where the kind launches them) and wait until every one
is healthy; then install them, so new requests go to the new version at once, while requests already
on the old deployments (streams included: they hold an admission slot until they end) finish within
a grace period; then stop the old ones. If the new version never becomes healthy, it is stopped and
the old one keeps serving (rollback).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from strata.config import ModelConfig
from strata.security.egress import EgressPolicy
from strata.serving.pool import ModelPool
from strata.serving.router import Router

log = structlog.get_logger("strata.hotswap")

State = Literal["starting", "serving", "draining", "stopped", "failed"]
CONFIG_REFERENCE: dict[str, Any] = {"source": "config"}


class DeployFailed(Exception):
    """The new version never became healthy; the previous one is still serving."""


@dataclass
class VersionRecord:
    model: str
    version: int
    state: State
    deployments: list[str]
    started_at: float = field(default_factory=time.time)
    note: str | None = None
    #: What this version was deployed from: {"source": "config"}, {"profile": name}, or an openai endpoint.
    reference: dict[str, Any] = field(default_factory=lambda: dict(CONFIG_REFERENCE))

    def view(self) -> dict[str, Any]:
        return {"version": self.version, "state": self.state, "deployments": self.deployments,
                "reference": self.reference, "note": self.note}  # fmt: skip


class ModelDeployer:
    def __init__(self, router: Router, *, health_timeout_s: float = 120.0, drain_grace_s: float = 30.0) -> None:
        self._router = router
        self._health_timeout_s = health_timeout_s
        self._drain_grace_s = drain_grace_s
        self._locks: dict[str, asyncio.Lock] = {}
        self.history: dict[str, list[VersionRecord]] = {}
        self._drains: set[asyncio.Task[None]] = set()
        for name in router.models:
            if router.is_model(name):
                pool = router.pool(name)
                self.history[name] = [VersionRecord(name, 1, "serving", [d.name for d in pool.deployments])]

    async def deploy(
        self,
        config: ModelConfig,
        *,
        health_timeout_s: float | None = None,
        egress: EgressPolicy | None = None,
        reference: dict[str, Any] | None = None,
        version: int | None = None,
    ) -> VersionRecord:
        """Bring `config` into service as the next version of its model (a new model if it has none).
        `egress` guards the DNS of endpoints given over the API; `reference` says where `config` came from;
        `version`: its number in the cluster (default: the next one here)."""
        async with self._locks.setdefault(config.name, asyncio.Lock()):
            assert self._router.factory is not None
            records = self.history.setdefault(config.name, [])
            version = version or self.latest(config.name) + 1
            pool = self._router.factory(config, egress)
            pool.version = version
            record = VersionRecord(config.name, version, "starting", [d.name for d in pool.deployments])
            record.reference = dict(reference or CONFIG_REFERENCE)
            records.append(record)
            log.info("deploying", model=config.name, version=version, deployments=record.deployments)
            if not await self._start_healthy(pool, health_timeout_s or self._health_timeout_s):
                await asyncio.gather(*(d.stop(5.0) for d in pool.deployments), return_exceptions=True)
                record.state, record.note = "failed", "never became healthy; the previous version keeps serving"
                log.error("deploy rolled back", model=config.name, version=version)
                raise DeployFailed(f"version {version} of {config.name!r} never became healthy; rolled back")
            previous = self._router.install(pool)
            record.state = "serving"
            log.info("deployed", model=config.name, version=version)
            if previous is not None:
                self._drain_later(previous, records)
            return record

    def latest(self, model: str) -> int:
        """The highest version number this replica has used for `model` (0: none)."""
        return max((r.version for r in self.history.get(model, ())), default=0)

    def relabel(self, model: str, version: int, reference: dict[str, Any]) -> None:
        """The version in service is already what `version` stands for: give it that number and reference."""
        record = self.serving(model)
        if record is not None and self._router.is_model(model):
            self._router.pool(model).version = record.version = version
            record.reference = dict(reference)

    def serving(self, model: str) -> VersionRecord | None:
        """The version of `model` in service, if any."""
        return next((r for r in reversed(self.history.get(model, [])) if r.state == "serving"), None)

    def snapshot(self) -> dict[str, dict[str, Any] | None]:
        """Each model's version in service and what it came from (the before and after of audit rows)."""
        out: dict[str, dict[str, Any] | None] = {}
        for model in self.history:
            record = self.serving(model)
            out[model] = {"version": record.version, "reference": record.reference} if record else None
        return out

    async def remove(self, model: str) -> None:
        async with self._locks.setdefault(model, asyncio.Lock()):
            previous = self._router.uninstall(model)
            if previous is not None:
                self._drain_later(previous, self.history.get(model, []))

    def _drain_later(self, pool: ModelPool, records: list[VersionRecord]) -> None:
        old = next((r for r in records if r.version == pool.version and r.state == "serving"), None)
        if old is not None:
            old.state = "draining"
        task = asyncio.create_task(self._drain(pool, old))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _start_healthy(self, pool: ModelPool, timeout_s: float) -> bool:
        try:
            for deployment in pool.deployments:
                await deployment.start()
        except Exception as exc:
            log.error("deployment failed to start", model=pool.model, error=str(exc))
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            results = await asyncio.gather(*(d.probe() for d in pool.deployments))
            if all(results):
                return True
            await asyncio.sleep(0.2)
        return False

    async def _drain(self, pool: ModelPool, record: VersionRecord | None) -> None:
        """Wait for the old version's in-flight requests (bounded by the grace period), then stop it."""
        deadline = time.monotonic() + self._drain_grace_s
        while time.monotonic() < deadline:
            if all(d.admission.in_flight == 0 and d.admission.queued == 0 for d in pool.deployments):
                break
            await asyncio.sleep(0.1)
        left = sum(d.admission.in_flight for d in pool.deployments)
        if left:
            log.warning("grace period over; stopping the old version with requests in flight", model=pool.model,
                        version=pool.version, in_flight=left)  # fmt: skip
        await asyncio.gather(*(d.stop(5.0) for d in pool.deployments), return_exceptions=True)
        if record is not None:
            record.state = "stopped"
        log.info("old version stopped", model=pool.model, version=pool.version)

    async def wait_drained(self) -> None:
        if self._drains:
            await asyncio.gather(*list(self._drains), return_exceptions=True)
