"""Who is calling: the authenticated identity that travels with a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from strata.config import RoleName
from strata.security.rbac import Permission, allows


@dataclass(frozen=True, slots=True)
class Principal:
    user: str  # owner of the sessions, runs and usage this principal creates
    role: RoleName
    via: Literal["key", "jwt"]
    key_id: str | None = None  # None for a JWT
    name: str = ""  # the key's name, or the token's subject
    models: frozenset[str] | None = None  # None: every model
    agents: frozenset[str] | None = None  # None: every agent
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None

    def may(self, permission: Permission) -> bool:
        return allows(self.role, permission)

    def may_use_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def may_use_agent(self, agent: str) -> bool:
        return self.agents is None or agent in self.agents

    @property
    def sees_everyones_runs(self) -> bool:
        return self.may(Permission.RUNS_READ_ALL)

    @property
    def label(self) -> str:
        """How audit rows name the actor."""
        return f"key:{self.key_id}" if self.key_id else f"jwt:{self.user}"
