"""Roles and what each may do. Routes name a permission (api/permissions.py); roles grant them here."""

from __future__ import annotations

from enum import StrEnum
from typing import get_args

from strata.config import RoleName


class Permission(StrEnum):
    MODELS_INVOKE = "models:invoke"
    MODELS_READ = "models:read"
    AGENTS_INVOKE = "agents:invoke"  # start runs and sessions, follow and steer one's own
    AGENTS_READ = "agents:read"
    AGENTS_WRITE = "agents:write"  # publish agent versions that keep every guard (agents/guard_changes.py)
    AGENTS_WEAKEN_GUARDS = "agents:weaken_guards"  # publish versions that weaken one: fewer approvals, more tools...
    RUNS_READ = "runs:read"  # one's own sessions and runs
    RUNS_READ_ALL = "runs:read_all"  # every user's sessions and runs
    RUNS_WRITE_ALL = "runs:write_all"  # cancel or approve anyone's runs
    DEPLOYMENTS_READ = "deployments:read"
    DEPLOYMENTS_WRITE = "deployments:write"  # deploy, hot swap
    CONFIG_WRITE = "config:write"  # reload
    GPUS_READ = "gpus:read"
    METRICS_READ = "metrics:read"
    KEYS_MANAGE = "keys:manage"
    AUDIT_READ = "audit:read"
    USAGE_READ_ALL = "usage:read_all"
    API_SCHEMA_READ = "api:schema"


P = Permission
_USER = frozenset({P.MODELS_INVOKE, P.MODELS_READ, P.AGENTS_INVOKE, P.AGENTS_READ, P.RUNS_READ, P.API_SCHEMA_READ})

ROLE_PERMISSIONS: dict[RoleName, frozenset[Permission]] = {
    "admin": frozenset(Permission),
    "operator": _USER
    | {P.AGENTS_WRITE, P.DEPLOYMENTS_READ, P.DEPLOYMENTS_WRITE, P.CONFIG_WRITE, P.GPUS_READ, P.METRICS_READ},
    "developer": _USER | {P.AGENTS_WRITE},
    "user": _USER,
    "auditor": frozenset(
        {P.AUDIT_READ, P.USAGE_READ_ALL, P.RUNS_READ, P.RUNS_READ_ALL, P.MODELS_READ, P.AGENTS_READ, P.API_SCHEMA_READ}
    ),
    # A scraper's key (Prometheus): the metrics and nothing else, so the key on its disk cannot call a model.
    "metrics": frozenset({P.METRICS_READ}),
}
ROLES: tuple[RoleName, ...] = get_args(RoleName)


def allows(role: RoleName, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS[role]
