"""Versioned agent specs. Every change, from the config file or the admin API, is a new version;
a run pins the version it started with."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from strata.store.database import Database
from strata.store.runs import utcnow
from strata.store.tables import AgentVersion


class VersionConflict(Exception):
    """Another version was published since the one a change was checked against."""


class AgentVersionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def latest(self, name: str) -> AgentVersion | None:
        async with self.db.sessions() as tx:
            rows = await tx.execute(
                select(AgentVersion).where(AgentVersion.name == name).order_by(AgentVersion.version.desc()).limit(1)
            )
            return rows.scalar_one_or_none()

    async def get(self, name: str, version: int) -> AgentVersion | None:
        async with self.db.sessions() as tx:
            rows = await tx.execute(
                select(AgentVersion).where(AgentVersion.name == name, AgentVersion.version == version)
            )
            return rows.scalar_one_or_none()

    async def versions(self, name: str) -> list[AgentVersion]:
        async with self.db.sessions() as tx:
            rows = await tx.execute(
                select(AgentVersion).where(AgentVersion.name == name).order_by(AgentVersion.version)
            )
            return list(rows.scalars())

    async def names(self) -> list[str]:
        async with self.db.sessions() as tx:
            rows = await tx.execute(select(AgentVersion.name).distinct().order_by(AgentVersion.name))
            return list(rows.scalars())

    async def add(self, name: str, spec: dict[str, Any], source: str, *, after: int | None = None) -> AgentVersion:
        """`after`: the version the change was checked against (0: none); `VersionConflict` if the latest is another."""
        try:
            async with self.db.transaction() as tx:
                current = (
                    await tx.execute(select(func.max(AgentVersion.version)).where(AgentVersion.name == name))
                ).scalar_one()
                if after is not None and (current or 0) != after:
                    raise VersionConflict(f"agent {name!r} is at version {current or 0}, not {after}")
                row = AgentVersion(name=name, version=(current or 0) + 1, spec=spec, source=source, created_at=utcnow())
                tx.add(row)
        except IntegrityError:  # a concurrent publish took this version number
            if after is None:
                raise
            raise VersionConflict(f"agent {name!r} changed while this version was being published") from None
        return row

    async def sync_from_config(self, name: str, spec: dict[str, Any]) -> AgentVersion:
        """A config agent gets a new version only when the file changed since the last config sync,
        so an edit made through the admin API survives restarts of an unchanged file."""
        async with self.db.sessions() as tx:
            rows = await tx.execute(
                select(AgentVersion)
                .where(AgentVersion.name == name, AgentVersion.source == "config")
                .order_by(AgentVersion.version.desc())
                .limit(1)
            )
            last_config = rows.scalar_one_or_none()
        if last_config is not None and last_config.spec == spec:
            latest = await self.latest(name)
            assert latest is not None
            return latest
        return await self.add(name, spec, "config")
