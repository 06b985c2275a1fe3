"""The cluster's model versions: what every replica should serve, what each one does serve, and the
config reloads each replica applies to its own file."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from strata.store.database import Database
from strata.store.runs import utcnow
from strata.store.tables import ConfigReload, ModelReplica, ModelVersion

PRUNE_AFTER = timedelta(days=1)


@dataclass(frozen=True)
class Desired:
    model: str
    version: int
    reference: dict[str, Any]


@dataclass(frozen=True)
class ReplicaState:
    """One replica's view of one model, as it reports it."""

    model: str
    version: int | None
    desired: int | None
    state: str
    note: str | None = None


@dataclass(frozen=True)
class ReplicaRow(ReplicaState):
    replica: str = ""
    seen_at: datetime | None = None


class ModelVersionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def allocate(self, model: str, floor: int = 1) -> int:
        """The next version number of `model`, unique across replicas; `floor`: a number already in use here
        (every replica serves the config's model as version 1)."""
        greatest = func.max if self.db.is_sqlite else func.greatest  # SQLite's two-argument max()
        for _ in range(3):
            async with self.db.transaction() as tx:
                result = await tx.execute(
                    update(ModelVersion)
                    .where(ModelVersion.model == model)
                    .values(allocated=greatest(ModelVersion.allocated, floor) + 1)
                    .returning(ModelVersion.allocated)
                )
                number = result.scalar_one_or_none()
            if number is not None:
                return int(number)
            try:
                async with self.db.transaction() as tx:
                    tx.add(ModelVersion(model=model, version=0, allocated=floor + 1, reference={}, updated_at=utcnow()))
                return floor + 1
            except IntegrityError:
                continue  # another replica created the row first: take the next number from it
        raise RuntimeError(f"cannot allocate a version of {model!r}")

    async def set_desired(self, model: str, version: int, reference: dict[str, Any], by: str | None) -> bool:
        """Make `version` the one every replica should serve, unless a later one already is."""
        async with self.db.transaction() as tx:
            return await _set_desired(tx, model, version, reference, by)

    async def add_reload(self, desired: Iterable[Desired], by: str | None) -> int:
        """A reload and the versions it makes desired, in one transaction: a replica that sees those versions
        also sees the reload, so it re-reads its file before it looks for them there."""
        async with self.db.transaction() as tx:
            row = ConfigReload(at=utcnow(), by=by)
            tx.add(row)
            await tx.flush()
            for d in desired:
                await _set_desired(tx, d.model, d.version, d.reference, by)
            return int(row.id)

    async def desired(self) -> list[Desired]:
        async with self.db.sessions() as tx:
            rows = await tx.execute(select(ModelVersion).where(ModelVersion.version > 0).order_by(ModelVersion.model))
            return [Desired(r.model, r.version, r.reference) for r in rows.scalars()]

    async def latest_reload(self) -> int:
        async with self.db.sessions() as tx:
            return int((await tx.execute(select(func.max(ConfigReload.id)))).scalar_one() or 0)

    async def report(self, replica: str, states: Iterable[ReplicaState], gone: Iterable[str] = ()) -> None:
        """This replica's state of the given models (and none for `gone`); the heartbeat of all its rows.
        Rows of replicas silent for a day (crashed, never to return under their name) go."""
        now = utcnow()
        async with self.db.transaction() as tx:
            for s in states:
                await tx.merge(ModelReplica(replica=replica, model=s.model, version=s.version, desired=s.desired,
                                            state=s.state, note=s.note, seen_at=now))  # fmt: skip
            gone = list(gone)
            if gone:
                await tx.execute(delete(ModelReplica).where(ModelReplica.replica == replica,
                                                            ModelReplica.model.in_(gone)))  # fmt: skip
            await tx.execute(update(ModelReplica).where(ModelReplica.replica == replica).values(seen_at=now))
            await tx.execute(delete(ModelReplica).where(ModelReplica.seen_at < now - PRUNE_AFTER))

    async def replicas(self, max_age_s: float) -> list[ReplicaRow]:
        """Every replica's rows, of replicas heard from within `max_age_s`."""
        since = utcnow() - timedelta(seconds=max_age_s)
        async with self.db.sessions() as tx:
            rows = await tx.execute(
                select(ModelReplica).where(ModelReplica.seen_at >= since).order_by(ModelReplica.replica)
            )
            return [
                ReplicaRow(r.model, r.version, r.desired, r.state, r.note, replica=r.replica, seen_at=r.seen_at)
                for r in rows.scalars()
            ]

    async def forget(self, replica: str) -> None:
        """A replica that stops takes its rows with it."""
        async with self.db.transaction() as tx:
            await tx.execute(delete(ModelReplica).where(ModelReplica.replica == replica))


async def _set_desired(tx: AsyncSession, model: str, version: int, reference: dict[str, Any], by: str | None) -> bool:
    result = await tx.execute(
        update(ModelVersion)
        .where(ModelVersion.model == model, ModelVersion.version < version)
        .values(version=version, reference=reference, updated_at=utcnow(), updated_by=by)
    )
    return bool(result.rowcount)
