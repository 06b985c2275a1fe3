"""Hot swap and reload for the whole cluster: the desired version of each model lives in the database and
every replica converges on it.

A deploy is health-checked on the replica that was asked; once it serves, its *reference* (a config
profile, an openai endpoint, {"source": "config"} or {"removed": true}, never a launch spec) becomes the
desired version. A reload re-reads the file, marks what changed as desired and asks every replica to
re-read its own file. Replicas are told through Redis (`coordination.Signal`) and poll the database
every `deploy.sync_interval_s` in any case; each resolves a reference against its *own* configuration
(a profile it lacks, an endpoint its egress rules refuse: it keeps its version and says why) and
reports what it serves, which `GET /admin/models` shows for every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import ValidationError

from strata.api.state import AppState
from strata.config import ModelConfig, StrataConfig
from strata.config_loader import load_config
from strata.coordination import Signal
from strata.security.egress import EgressPolicy
from strata.serving.deploy_policy import DeployPolicy, DeployRefused, ResolvedDeploy
from strata.serving.hotswap import CONFIG_REFERENCE, DeployFailed, VersionRecord
from strata.store.model_versions import Desired, ModelVersionStore, ReplicaRow, ReplicaState

log = structlog.get_logger("strata.model_sync")
CHANNEL = "strata:models:changed"
REMOVED: dict[str, Any] = {"removed": True}


@dataclass
class ReloadReport:
    deployed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Applied:
    """What this replica did with a desired version of a model."""

    desired: int
    state: str  # serving, removed, failed (never healthy: rolled back), refused (its config says no)
    note: str | None = None


def replica_name(port: int) -> str:
    """Host and port: a restarted replica takes over its own rows; pods have distinct host names."""
    return f"{socket.gethostname()}:{port}"[-96:]


class ModelSync:
    def __init__(
        self, state: AppState, store: ModelVersionStore, signal: Signal, *, interval_s: float, replica: str
    ) -> None:
        self._state = state
        self._store = store
        self._signal = signal
        self._interval_s = interval_s
        self.replica = replica
        self._applied: dict[str, Applied] = {}
        self._reported: dict[str, ReplicaState] = {}
        self._reload_seen = 0
        self._lock = asyncio.Lock()  # one convergence (or reload) at a time
        self._task: asyncio.Task[None] | None = None

    @property
    def freshness_s(self) -> float:
        """A replica not heard from for this long is left out of the listing."""
        return 3 * self._interval_s + 10.0

    async def start(self) -> None:
        self._reload_seen = await self._store.latest_reload()  # this replica has just read its file
        await self._signal.start()
        self._task = asyncio.create_task(self._loop(), name="models:sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._signal.stop()
        with contextlib.suppress(Exception):
            await self._store.forget(self.replica)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception:
                log.exception("model sync failed; retrying at the next interval")
            await self._signal.wait(self._interval_s)

    # -- what the API asks -------------------------------------------------------------------

    async def deploy(self, resolved: ResolvedDeploy, *, health_timeout_s: float | None, actor: str) -> VersionRecord:
        """Deploy here (health-checked; `DeployFailed` leaves the cluster as it was), then make it the
        version every replica serves."""
        name = resolved.config.name
        version = await self._store.allocate(name, floor=self._state.deployer.latest(name))
        record = await self._state.deployer.deploy(
            resolved.config,
            health_timeout_s=health_timeout_s,
            egress=resolved.egress,
            reference=resolved.reference,
            version=version,
        )
        self._applied[name] = Applied(version, "serving")
        await self._store.set_desired(name, version, resolved.reference, actor)
        await self._report()
        await self._signal.publish()
        return record

    async def reload(self, actor: str) -> ReloadReport:
        """Re-read the file; what changed in it becomes the desired version, here and on every replica
        (each from its own file). `ConfigError` if the file is invalid: nothing changes."""
        config = load_config(self._state.config_path)
        report = ReloadReport()
        changes: dict[str, dict[str, Any]] = {}
        router, deployer = self._state.router, self._state.deployer
        for model in config.models:
            current = deployer.serving(model.name)
            same = router.is_model(model.name) and router.pool(model.name).config == model
            if same and current is not None and current.reference == CONFIG_REFERENCE:
                report.unchanged.append(model.name)
            else:
                changes[model.name] = CONFIG_REFERENCE
        wanted = {model.name for model in config.models}
        changes |= {name: REMOVED for name in router.models if router.is_model(name) and name not in wanted}
        async with self._lock:
            desired = [
                Desired(name, await self._store.allocate(name, floor=deployer.latest(name)), reference)
                for name, reference in changes.items()
            ]
            self._reload_seen = await self._store.add_reload(desired, actor)
            await self._adopt_config(config)
            await self._converge()
        await self._report()
        await self._signal.publish()
        for name in changes:
            applied = self._applied.get(name)
            if applied is None:
                continue
            if applied.state == "serving":
                report.deployed.append(name)
            elif applied.state == "removed":
                report.removed.append(name)
            else:
                report.failed[name] = applied.note or applied.state
        log.info("configuration reloaded", **report.__dict__)
        return report

    async def view(self) -> tuple[dict[str, Desired], list[ReplicaRow]]:
        """The desired versions and every live replica's report, for `GET /admin/models`."""
        desired = {d.model: d for d in await self._store.desired()}
        return desired, await self._store.replicas(self.freshness_s)

    # -- convergence -------------------------------------------------------------------------

    async def sync_once(self) -> None:
        async with self._lock:
            # The desired versions first, then the reloads: a reload is written with the versions it makes
            # desired, so whatever of them is read here comes with (or after) the reload that explains it.
            desired = await self._store.desired()
            latest = await self._store.latest_reload()
            if latest > self._reload_seen:
                self._reload_seen = latest
                try:
                    await self._adopt_config(load_config(self._state.config_path))
                except Exception as exc:  # an invalid file here must not stop this replica converging
                    log.error("a reload elsewhere: this replica's configuration cannot be read", error=str(exc))
            await self._converge(desired)
        await self._report()

    async def _adopt_config(self, config: StrataConfig) -> None:
        """Routes and agents from a (re-read) file; its models arrive through the desired versions."""
        self._state.router.set_routes(config.routes)
        if self._state.runtime is not None:
            await self._state.runtime.catalog.sync(config.agents)
            self._state.runtime.tools.reconnect_mcp_servers()  # one that is down tries now, not after its backoff
        self._state.config = config

    async def _converge(self, desired_versions: list[Desired] | None = None) -> None:
        for desired in desired_versions if desired_versions is not None else await self._store.desired():
            if desired.version > self._acted_on(desired.model):
                self._applied[desired.model] = await self._apply(desired)

    def _acted_on(self, model: str) -> int:
        applied = self._applied.get(model)
        if applied is not None:
            return applied.desired
        record = self._state.deployer.serving(model)  # at start: the config's model, version 1
        return record.version if record is not None else 0

    async def _apply(self, desired: Desired) -> Applied:
        model, version, reference = desired.model, desired.version, desired.reference
        deployer, router = self._state.deployer, self._state.router
        try:
            if reference == REMOVED:
                await deployer.remove(model)
                log.info("model removed", model=model, version=version)
                return Applied(version, "removed")
            config, egress = await self._resolve(model, reference)
            current = deployer.serving(model)
            if (
                current is not None
                and router.is_model(model)
                and router.pool(model).config == config
                and current.reference == reference
            ):
                deployer.relabel(model, version, reference)  # what serves here already is that version
            else:
                await deployer.deploy(config, egress=egress, reference=reference, version=version)
            return Applied(version, "serving")
        except DeployRefused as exc:
            log.warning("desired version refused by this replica's configuration", model=model, version=version,
                        reason=exc.message)  # fmt: skip
            return Applied(version, "refused", exc.message)
        except ValidationError as exc:
            note = "; ".join(str(e["msg"]) for e in exc.errors(include_url=False))
            log.warning("desired version invalid here", model=model, version=version, reason=note)
            return Applied(version, "refused", note)
        except DeployFailed as exc:
            return Applied(version, "failed", str(exc))
        except Exception as exc:  # e.g. a launcher this machine lacks: fail this version, not the loop
            log.exception("desired version could not be deployed here", model=model, version=version)
            return Applied(version, "failed", f"{type(exc).__name__}: {exc}")

    async def _resolve(self, model: str, reference: dict[str, Any]) -> tuple[ModelConfig, EgressPolicy | None]:
        config = self._state.config
        if reference == CONFIG_REFERENCE:
            own = next((m for m in config.models if m.name == model), None)
            if own is None:
                raise DeployRefused(400, f"model {model!r} is not in this replica's configuration", param=None)
            return own, None
        resolved = await DeployPolicy(config.deploy).resolve(model, reference)
        return resolved.config, resolved.egress

    async def _report(self) -> None:
        deployer = self._state.deployer
        states: dict[str, ReplicaState] = {}
        for model in set(deployer.history) | set(self._applied):
            serving = deployer.serving(model)
            applied = self._applied.get(model)
            version = serving.version if serving is not None else None
            if applied is None:
                states[model] = ReplicaState(model, version, version, "serving" if serving else "removed")
            else:
                states[model] = ReplicaState(model, version, applied.desired, applied.state, applied.note)
        changed = [s for name, s in states.items() if self._reported.get(name) != s]
        gone = [name for name in self._reported if name not in states]
        await self._store.report(self.replica, changed, gone)
        self._reported = states
