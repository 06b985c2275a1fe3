"""Runs, their steps, events and session messages: every write the run engine makes.

Writes by the worker that owns a run are *fenced*: each unit of work first extends the run's lease
on the condition that this worker still holds it, so a worker that lost its lease (paused, partitioned)
can never write over the worker that took the run over.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Select, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from strata.store.database import Database
from strata.store.idempotency import lookup_forms, stored_form
from strata.store.run_journal import JournalWriter, LeaseLost, RunBatch
from strata.store.tables import Event, Message, Run, Session, Step

log = structlog.get_logger("strata.runs")

ACTIVE = ("queued", "running", "awaiting_approval", "waiting")  # waiting: for its child runs, holding no worker
TERMINAL = ("completed", "failed", "cancelled")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class StoredEvent:
    run_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Heartbeat:
    alive: bool
    cancel_requested: bool


@dataclass
class Unit:
    """One transaction. Events added here are published (after commit) to live subscribers."""

    tx: AsyncSession
    events: list[StoredEvent] = field(default_factory=list)

    async def add_event(self, run_id: str, type_: str, data: dict[str, Any]) -> StoredEvent:
        seq = (
            await self.tx.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(next_event_seq=Run.next_event_seq + 1)
                .returning(Run.next_event_seq)
            )
        ).scalar_one()
        now = utcnow()
        self.tx.add(Event(run_id=run_id, seq=seq, type=type_, data=data, created_at=now))
        stored = StoredEvent(run_id, seq, type_, data, now)
        self.events.append(stored)
        return stored

    async def add_message(self, session_id: str, run_id: str | None, data: dict[str, Any]) -> Message:
        seq = (
            await self.tx.execute(
                update(Session)
                .where(Session.id == session_id)
                .values(next_message_seq=Session.next_message_seq + 1, updated_at=utcnow())
                .returning(Session.next_message_seq)
            )
        ).scalar_one()
        now = utcnow()
        message = Message(session_id=session_id, seq=seq, run_id=run_id, role=data["role"], data=data, created_at=now)
        self.tx.add(message)
        return message


class RunStore:
    def __init__(
        self,
        db: Database,
        publish: Callable[[StoredEvent], None] | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """`clock`: what leases are measured against (claims, heartbeats, sweeps, fenced writes); tests move it."""
        self.db = db
        self._publish = publish or (lambda _event: None)
        self.clock = clock
        self._journal = JournalWriter(db, clock)

    async def commit(self, run: Run, owner: str, lease_s: float, batch: RunBatch) -> None:
        """Write a worker's batch in one transaction fenced on its lease (`LeaseLost` if it has none), then
        number its messages, bring `run` up to date (event numbers, a terminal state; the worker keeps the
        counters it added itself), publish its events and run its `after` callbacks (settle the usage).

        All of that runs to the end even if the caller is cancelled meanwhile (a shutdown, a cancel, the run's
        timeout): a batch once handed to the database may land, and if it does its events must reach followers
        and its steps' usage must be settled, now, not with some later commit that may never come. The caller
        sees the `CancelledError` only once it is done, so whatever it does next (release the run, end it)
        comes after this write, never racing it on another connection."""
        if not batch:
            return
        task = asyncio.ensure_future(self._commit(run, owner, lease_s, batch))
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True  # and wait on: the write (and what follows it) is under way
        if not cancelled:
            task.result()  # LeaseLost, or the write's error
            return
        if not task.cancelled() and (error := task.exception()) is not None and not isinstance(error, LeaseLost):
            log.warning("a run's batch failed while its run was being stopped", run_id=run.id, exc_info=error)
        raise asyncio.CancelledError

    async def _commit(self, run: Run, owner: str, lease_s: float, batch: RunBatch) -> None:
        done = await self._journal.write(run.id, run.session_id, owner, lease_s, batch)
        for index, message in enumerate(batch.messages):
            message.seq = done.first_message_seq + index
        if batch.events:
            run.next_event_seq = done.first_event_seq + len(batch.events) - 1
        if batch.finish is not None:
            for name, value in batch.finish.items():
                setattr(run, name, value)
            run.finished_at = done.at  # the time written (the batch's is when it was made)
        for index, (type_, data) in enumerate(batch.events):
            self._publish(StoredEvent(run.id, done.first_event_seq + index, type_, data, done.at))
        failed: Exception | None = None
        for settle in batch.after:  # each one: a settlement that fails does not skip the others
            try:
                await settle()
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    async def close(self) -> None:
        """Stop the journal's writer thread once its last write is done (the database is the caller's); a commit
        after this raises `run_journal.JournalClosed`."""
        self._journal.refuse_writes()  # at once, on the loop: no later write can start the writer again
        await asyncio.to_thread(self._journal.close)

    @asynccontextmanager
    async def unit(
        self, *, run_id: str | None = None, owner: str | None = None, lease_s: float = 0
    ) -> AsyncIterator[Unit]:
        """A transaction; with `owner`, fenced on (and extending) that worker's lease of `run_id`."""
        async with self.db.transaction() as tx:
            if owner is not None:
                held = await tx.execute(
                    update(Run)
                    .where(Run.id == run_id, Run.lease_owner == owner, Run.status == "running")
                    .values(lease_expires_at=self.clock() + timedelta(seconds=lease_s))
                )
                if held.rowcount != 1:
                    raise LeaseLost(run_id)
            unit = Unit(tx)
            yield unit
        for event in unit.events:
            self._publish(event)

    # -- sessions ----------------------------------------------------------------------------

    @staticmethod
    def new_session(agent: str, owner: str | None, metadata: dict[str, Any] | None = None) -> Session:
        """A session not yet stored: `create_run(new_session=...)` stores it with its first run."""
        now = utcnow()
        return Session(
            id=new_id("sess"), agent=agent, owner=owner, metadata_=metadata or {}, created_at=now, updated_at=now
        )

    async def create_session(self, agent: str, owner: str | None, metadata: dict[str, Any] | None = None) -> Session:
        session = self.new_session(agent, owner, metadata)
        async with self.db.transaction() as tx:
            tx.add(session)
        return session

    async def get_session(self, session_id: str) -> Session | None:
        async with self.db.sessions() as tx:
            return await tx.get(Session, session_id)

    async def messages(self, session_id: str) -> list[Message]:
        async with self.db.sessions() as tx:
            rows = await tx.execute(select(Message).where(Message.session_id == session_id).order_by(Message.seq))
            return list(rows.scalars())

    # -- runs --------------------------------------------------------------------------------

    async def create_run(
        self,
        *,
        session_id: str,
        agent: str,
        agent_version: int,
        owner: str | None,
        input_message: dict[str, Any],
        idempotency_key: str | None,
        timeout_s: float,
        trace_parent: str | None = None,
        key_id: str | None = None,
        allowed_models: list[str] | None = None,
        new_session: Session | None = None,
        claim_for: tuple[str, float] | None = None,
        model: str | None = None,
        parent_run_id: str | None = None,
    ) -> tuple[Run, bool]:
        """Persist a queued run (the acknowledgement point). Returns (run, created).

        `trace_parent`: the W3C traceparent of the request creating it, which the run's spans join.
        `allowed_models`: the models its key may use (None: any); the engine holds every model call to them.
        `new_session`: from `new_session()`, stored in the same transaction (one commit for a new conversation).
        `claim_for`: (worker, lease_s), with `new_session` only: the run is stored already claimed by that
        worker, exactly as `claim` would leave it (running, leased, started, attempt 1), so that worker can start
        it at once with no claim round trip; its lease expires and is swept like any other if the worker dies.
        Only a run opening a new session may skip the queue: no earlier run of its session can exist.
        `model`: the agent's model; only workers whose replica serves it claim the run (see `claim`).
        `parent_run_id`: the run that starts this one as its child (see `wake_parent`)."""
        if idempotency_key:
            existing = await self.by_idempotency_key(agent, idempotency_key)
            if existing is not None:
                return existing, False
        now = self.clock()
        run = Run(
            id=new_id("run"),
            session_id=session_id,
            agent=agent,
            agent_version=agent_version,
            owner=owner,
            status="queued",
            idempotency_key=stored_form(self.db.keyring, idempotency_key) if idempotency_key else None,
            input=input_message,
            approvals={},
            created_at=now,
            deadline_at=now + timedelta(seconds=timeout_s),
            trace_parent=trace_parent,
            key_id=key_id,
            allowed_models=allowed_models,
            model=model,
            parent_run_id=parent_run_id,
        )
        if claim_for is not None:
            if new_session is None or new_session.id != session_id:
                raise ValueError("only a run opening a new session is created claimed")
            worker, lease_s = claim_for
            run.status, run.lease_owner, run.lease_expires_at = "running", worker, now + timedelta(seconds=lease_s)
            run.started_at, run.attempts = now, 1
            # What the worker reads before it writes (limits, cancel flag), loaded as a claim would load them.
            run.steps_taken = run.prompt_tokens = run.completion_tokens = 0
            run.cost_usd, run.cancel_requested = 0.0, False
        try:
            async with self.unit() as unit:
                if new_session is not None:
                    unit.tx.add(new_session)
                unit.tx.add(run)
                await unit.tx.flush()
                created = await unit.add_event(run.id, "run.created", {"agent": agent, "session_id": session_id})
        except IntegrityError:
            if idempotency_key:  # a concurrent request with the same key won the race
                existing = await self.by_idempotency_key(agent, idempotency_key)
                if existing is not None:
                    return existing, False
            raise
        run.next_event_seq = created.seq  # as stored (the session is closed: this is no write)
        return run, True

    async def by_idempotency_key(self, agent: str, key: str) -> Run | None:
        """The run `agent` created with this Idempotency-Key (stored as a keyed hash: see `store.idempotency`)."""
        forms = lookup_forms(self.db.keyring, key)
        async with self.db.sessions() as tx:
            rows = await tx.execute(
                select(Run).where(Run.agent == agent, Run.idempotency_key.in_(forms)).order_by(Run.created_at)
            )
            return rows.scalars().first()

    async def get_run(self, run_id: str) -> Run | None:
        async with self.db.sessions() as tx:
            return await tx.get(Run, run_id)

    async def active_runs(self, session_id: str) -> list[Run]:
        async with self.db.sessions() as tx:
            rows = await tx.execute(
                select(Run).where(Run.session_id == session_id, Run.status.in_(ACTIVE)).order_by(Run.created_at)
            )
            return list(rows.scalars())

    async def steps(self, run_id: str) -> list[Step]:
        async with self.db.sessions() as tx:
            rows = await tx.execute(select(Step).where(Step.run_id == run_id).order_by(Step.id))
            return list(rows.scalars())

    async def events_after(self, run_id: str, seq: int, limit: int = 1000) -> list[StoredEvent]:
        async with self.db.sessions() as tx:
            rows = await tx.execute(
                select(Event).where(Event.run_id == run_id, Event.seq > seq).order_by(Event.seq).limit(limit)
            )
            return [StoredEvent(e.run_id, e.seq, e.type, e.data, aware(e.created_at)) for e in rows.scalars()]

    async def turn_started(self, run_id: str, seq: int) -> int:
        """The latest model turn whose `step.started` is at or before event `seq` (-1 if none): a follower that
        resumes after it streams that turn's text live. Every step.started of a turn (the model's, then its tool
        calls') carries the turn, and none is before its model step's, so the last one of any kind tells it."""
        if seq <= 0:
            return -1
        async with self.db.sessions() as tx:
            data = (
                await tx.execute(
                    select(Event.data)
                    .where(Event.run_id == run_id, Event.type == "step.started", Event.seq <= seq)
                    .order_by(Event.seq.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
        return -1 if data is None else int(data.get("turn", 0))

    # -- ownership ---------------------------------------------------------------------------

    async def claim(self, owner: str, lease_s: float, models: Collection[str] | None = None) -> Run | None:
        """Take the oldest queued run whose session has no earlier unfinished run; with `models` (what this
        replica serves), only a run of one of them (or of no recorded model): the others wait for a replica
        that serves theirs, until their deadline passes (then any worker takes them, to fail them)."""
        params: dict[str, Any] = {} if models is None else {"served": list(models), "now": self.clock()}
        query = _CLAIMABLE if models is None else _CLAIMABLE_SERVED
        if not self.db.is_sqlite:
            return await self._claim_locked(owner, lease_s, query, params)
        while True:
            # Look first without the write lock: most wake-ups of a worker find nothing to claim. A run found
            # claimable stays so until someone claims it (the earlier runs of its session have all ended).
            async with self.db.sessions() as tx:
                run_id = (await tx.execute(query, params)).scalar_one_or_none()
            if run_id is None:
                return None
            async with self.unit() as unit:
                run = await _take(unit, run_id, owner, lease_s, self.clock())
            if run is not None:
                return run
            # another worker took it between the look and the update: look again

    async def _claim_locked(
        self, owner: str, lease_s: float, query: Select[tuple[str]], params: dict[str, Any]
    ) -> Run | None:
        """PostgreSQL: workers of every replica claim at once; `SKIP LOCKED` makes each take a different run."""
        async with self.unit() as unit:
            locked = query.with_for_update(skip_locked=True, of=Run)
            run_id = (await unit.tx.execute(locked, params)).scalar_one_or_none()
            return None if run_id is None else await _take(unit, run_id, owner, lease_s, self.clock())

    async def heartbeat(self, run_id: str, owner: str, lease_s: float) -> Heartbeat:
        async with self.db.transaction() as tx:
            result = await tx.execute(
                update(Run)
                .where(Run.id == run_id, Run.lease_owner == owner, Run.status == "running")
                .values(lease_expires_at=self.clock() + timedelta(seconds=lease_s))
                .returning(Run.cancel_requested)
            )
            row = result.first()
        return Heartbeat(alive=row is not None, cancel_requested=bool(row and row[0]))

    async def release(self, run_id: str, owner: str) -> None:
        """Hand a running run back to the queue (graceful shutdown), so another worker resumes it now."""
        async with self.db.transaction() as tx:
            await tx.execute(
                update(Run)
                .where(Run.id == run_id, Run.lease_owner == owner, Run.status == "running")
                .values(status="queued", lease_owner=None, lease_expires_at=None)
            )

    async def sweep_expired(self) -> int:
        """Runs whose worker stopped heartbeating (crashed) go back to the queue.

        On SQLite it looks first, without the write lock: nearly every sweep finds nothing, and an UPDATE takes
        the database's one write lock even when it changes no row, so each worker's sweeps would queue the
        request path's writes (usage, runs, audit) behind them for nothing."""
        expired = and_(Run.status == "running", Run.lease_expires_at < self.clock())
        if self.db.is_sqlite:
            async with self.db.sessions() as tx:
                if (await tx.execute(select(Run.id).where(expired).limit(1))).first() is None:
                    return 0
        async with self.db.transaction() as tx:
            result = await tx.execute(
                update(Run).where(expired).values(status="queued", lease_owner=None, lease_expires_at=None)
            )
        return int(result.rowcount or 0)

    # -- control -----------------------------------------------------------------------------

    async def request_cancel(self, run_id: str) -> Run | None:
        """A queued or paused run is cancelled at once; a running one at its worker's next heartbeat."""
        async with self.unit() as unit:
            run = await unit.tx.get(Run, run_id, with_for_update=not self.db.is_sqlite)
            if run is None or run.status in TERMINAL:
                return run
            if run.status == "running":
                run.cancel_requested = True
            else:
                await finish(unit, run, "cancelled", "cancelled by request")
            return run

    async def wait_for_children(self, run_id: str, owner: str) -> Run | None:
        """Park a run this worker holds until its child runs have ended (`waiting`: no lease, no worker slot); None if
        it was cancelled meanwhile (then it is ended so). A child that ended while the parent was still running found
        no parent waiting: the parent is woken here, at once, if none of its children is still active."""
        async with self.unit(run_id=run_id, owner=owner, lease_s=0.0) as unit:
            run = await unit.tx.get(Run, run_id, populate_existing=True)
            assert run is not None
            if run.cancel_requested:
                await finish(unit, run, "cancelled", "cancelled by request")
                return None
            run.status, run.lease_owner, run.lease_expires_at = "waiting", None, None
            await unit.add_event(run.id, "run.suspended", {"reason": "children"})
        await self.wake(run_id)
        return run

    async def wake_parent(self, child: Run) -> None:
        """A child run ended: its parent, if it waits and has no other active child, is queued to go on."""
        if child.parent_run_id is not None:
            await self.wake(child.parent_run_id)

    async def wake(self, run_id: str) -> None:
        children = aliased(Run)
        active = exists().where(children.parent_run_id == run_id, children.status.in_(ACTIVE))
        async with self.db.transaction() as tx:
            await tx.execute(
                update(Run).where(Run.id == run_id, Run.status == "waiting", ~active).values(status="queued")
            )

    async def active_children(self, run_id: str) -> list[str]:
        async with self.db.sessions() as tx:
            rows = await tx.execute(select(Run.id).where(Run.parent_run_id == run_id, Run.status.in_(ACTIVE)))
            return list(rows.scalars())

    async def set_approvals(self, run_id: str, decisions: dict[str, Any]) -> Run | None:
        """Record decisions keyed by the pending calls' bindings (see agents/approvals.py); `StaleApproval` if one
        names no call pending now (the run moved on: that approval was for another call)."""
        async with self.unit() as unit:
            run = await unit.tx.get(Run, run_id, with_for_update=not self.db.is_sqlite)
            if run is None:
                return None
            if run.status != "awaiting_approval":  # decided meanwhile: nothing these decisions were about waits
                raise StaleApproval(sorted(decisions))
            if run.cancel_requested:
                await finish(unit, run, "cancelled", "cancelled by request")
                return run
            waiting = {binding_key(c) for c in run.pending_approval or []}
            stale = sorted(set(decisions) - waiting)
            if stale:
                raise StaleApproval(stale)
            run.approvals = {**(run.approvals or {}), **decisions}
            pending = [c for c in run.pending_approval or [] if binding_key(c) not in run.approvals]
            await unit.add_event(run.id, "approval.resolved", {"decisions": decisions})
            if not pending:
                run.status, run.pending_approval = "queued", None
            return run


class StaleApproval(Exception):
    """An approval for calls that are not pending (any more): approving them now would approve something else."""

    def __init__(self, bindings: list[str]) -> None:
        super().__init__(f"no pending call has binding {', '.join(bindings)}")
        self.bindings = bindings


def binding_key(entry: dict[str, Any]) -> str:
    """A pending call's approvals key: its binding (entries stored before bindings existed: its id)."""
    return str(entry.get("binding") or entry["id"])


def _claimable(served: bool = False) -> Select[tuple[str]]:
    earlier = aliased(Run)
    blocked = exists().where(
        and_(
            earlier.session_id == Run.session_id,
            earlier.id != Run.id,
            earlier.status.in_(ACTIVE),
            earlier.created_at < Run.created_at,
        )
    )
    query = select(Run.id).where(Run.status == "queued", ~blocked)
    if served:
        query = query.where(
            or_(
                Run.model.is_(None),
                Run.model.in_(bindparam("served", expanding=True)),
                Run.deadline_at < bindparam("now"),
            )
        )
    return query.order_by(Run.created_at).limit(1)


# Built once: each statement keeps its cache key, so a claim skips building SQL.
_CLAIMABLE = _claimable()
_CLAIMABLE_SERVED = _claimable(served=True)


async def _take(unit: Unit, run_id: str, owner: str, lease_s: float, now: datetime) -> Run | None:
    """Move a queued run to `running` under `owner`'s lease; None if it is no longer queued."""
    taken = await unit.tx.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == "queued")
        .values(
            status="running",
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            started_at=func.coalesce(Run.started_at, now),
            attempts=Run.attempts + 1,
        )
    )
    if taken.rowcount != 1:
        return None
    return await unit.tx.get(Run, run_id, populate_existing=True)


async def finish(unit: Unit, run: Run, status: str, reason: str | None, output: str | None = None) -> None:
    """Move a run to a terminal state, with its event, inside the caller's unit of work."""
    run.status = status
    run.status_reason = reason
    run.output = output if output is not None else run.output
    run.finished_at = utcnow()
    run.lease_owner = None
    run.lease_expires_at = None
    run.pending_approval = None
    data: dict[str, Any] = {"status": status, "reason": reason}
    if output is not None:
        data["output"] = output
    await unit.add_event(run.id, f"run.{status}", data)
