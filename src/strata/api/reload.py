"""Re-read the configuration (SIGHUP or `POST /admin/reload`) and apply its model changes by hot swap."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from strata.api.state import AppState
from strata.config_loader import ConfigError, load_config
from strata.security.audit import AuditRecord
from strata.serving.hotswap import DeployFailed

log = structlog.get_logger("strata.reload")


@dataclass
class ReloadReport:
    deployed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


async def reload_config(state: AppState) -> ReloadReport:
    """New and changed models are deployed (health-checked, then swapped in); removed ones drain."""
    try:
        config = load_config(state.config_path)
    except ConfigError as exc:
        log.error("reload refused: invalid configuration", errors=[str(i) for i in exc.issues])
        raise
    report = ReloadReport()
    router = state.router
    wanted = {model.name: model for model in config.models}
    for name, model in wanted.items():
        if router.is_model(name) and router.pool(name).config == model:
            report.unchanged.append(name)
            continue
        try:
            await state.deployer.deploy(model)
            report.deployed.append(name)
        except DeployFailed as exc:
            report.failed[name] = str(exc)
    for name in [n for n in router.models if router.is_model(n) and n not in wanted]:
        await state.deployer.remove(name)
        report.removed.append(name)
    router.set_routes(config.routes)
    if state.runtime is not None:
        await state.runtime.catalog.sync(config.agents)
    state.config = config
    log.info("configuration reloaded", **report.__dict__)
    return report


async def reload_on_signal(state: AppState) -> None:
    """SIGHUP: reload, and put it in the audit trail with the signal as the actor."""
    outcome: Literal["success", "failure"] = "success"
    before = state.deployer.snapshot()
    details: dict[str, Any]
    try:
        details = {"before": before, **(await reload_config(state)).__dict__, "after": state.deployer.snapshot()}
    except ConfigError as exc:
        outcome, details = "failure", {"before": before, "after": None, "errors": [str(i) for i in exc.issues]}
    if state.guard is not None:
        record = AuditRecord(action="config.reloaded", outcome=outcome, actor="signal:SIGHUP", resource="config",
                             details=details)  # fmt: skip
        state.guard.audit.record(record)
