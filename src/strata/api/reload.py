"""SIGHUP: re-read the configuration and apply it on every replica, as `POST /admin/reload` does.

MCP servers are supervised (reconnected with backoff) on their own; a reload only makes those that are
down try again at once. Changes to `tools:` take a restart."""

from __future__ import annotations

from typing import Any, Literal

from strata.api.state import AppState
from strata.config_loader import ConfigError
from strata.security.audit import AuditRecord

SIGNAL_ACTOR = "signal:SIGHUP"


async def reload_on_signal(state: AppState) -> None:
    """Reload, and put it in the audit trail with the signal as the actor, the models before and after."""
    sync = state.model_sync()
    outcome: Literal["success", "failure"] = "success"
    before = state.deployer.snapshot()
    details: dict[str, Any]
    try:
        report = await sync.reload(SIGNAL_ACTOR)
        details = {"before": before, "after": state.deployer.snapshot(), **report.__dict__}
    except ConfigError as exc:
        outcome, details = "failure", {"before": before, "after": None, "errors": [str(i) for i in exc.issues]}
    if state.guard is not None:
        record = AuditRecord(action="config.reloaded", outcome=outcome, actor=SIGNAL_ACTOR, resource="config",
                             details=details)  # fmt: skip
        state.guard.audit.record(record)
