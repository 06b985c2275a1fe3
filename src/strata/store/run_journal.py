"""The run engine's writes, one transaction per step boundary.

A worker gathers what a step produced (its completion, the message, the events, the run's counters) in a
`RunBatch` and commits it together with the *next* step's start, before that step runs: the guarantee is
unchanged (every step is written before the next begins; a step whose start was committed but whose result
was not is run again on resume), but a step costs one transaction instead of two, and that transaction is a
handful of statements: one fenced UPDATE of the run that also reserves the event numbers and adds to the
counters, one of the session for message numbers, then multi-row INSERTs and the step rows.

On a SQLite file the transaction runs on the stdlib driver in one dedicated thread: one hop off the event
loop per transaction, where the async driver makes several per statement (the hops, not SQLite, were most of
a step's cost). Elsewhere (PostgreSQL) the same function runs on the async engine's connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import bindparam, create_engine, event, func, insert, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from strata.store.database import Database, _sqlite_begin, _sqlite_pragmas
from strata.store.encrypted import attach_keyring
from strata.store.tables import Event, Message, Run, Session, Step


class LeaseLost(Exception):
    """This worker no longer owns the run; it must stop touching it."""


class JournalClosed(RuntimeError):
    """A write after the run store was closed (at shutdown): nothing more may be written through it."""


@dataclass
class RunBatch:
    """A run's writes since its worker's last commit. Messages are returned at once (for the worker's
    in-memory history) and numbered when committed."""

    messages: list[Message] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)
    completions: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    finish: dict[str, Any] | None = None
    after: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run once committed

    def __bool__(self) -> bool:
        return bool(self.messages or self.events or self.starts or self.completions or self.counters or self.finish)

    def add_message(self, session_id: str, run_id: str, data: dict[str, Any]) -> Message:
        message = Message(session_id=session_id, run_id=run_id, role=data["role"], data=data, created_at=utcnow())
        self.messages.append(message)
        return message

    def add_event(self, type_: str, data: dict[str, Any]) -> None:
        self.events.append((type_, data))

    def start_step(
        self,
        *,
        turn: int,
        kind: str,
        name: str,
        call_id: str = "",
        input_: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        """Record that a step is about to run; a step left `started` by a crash is started again."""
        self.starts.append(
            {
                "turn": turn, "kind": kind, "call_id": call_id, "name": name, "status": "started",
                "idempotency_key": idempotency_key, "input": input_, "attempts": 1, "started_at": utcnow(),
            }
        )  # fmt: skip

    def complete_step(
        self,
        *,
        turn: int,
        kind: str,
        call_id: str = "",
        status: str = "completed",
        output: dict[str, Any] | None = None,
        error: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        self.completions.append(
            {
                "b_turn": turn, "b_kind": kind, "b_call": call_id, "b_status": status, "b_output": output,
                "b_error": error, "b_prompt": prompt_tokens, "b_completion": completion_tokens,
                "b_finished": utcnow(),
            }
        )  # fmt: skip

    def count(self, **deltas: float) -> None:
        """Add to the run's counters (steps_taken, prompt_tokens, completion_tokens, cost_usd)."""
        for name, delta in deltas.items():
            self.counters[name] = self.counters.get(name, 0) + delta

    def end(self, status: str, reason: str | None, output: str | None) -> None:
        """Move the run to a terminal state, with its event."""
        values: dict[str, Any] = {"status": status, "status_reason": reason, "finished_at": utcnow()}
        values.update(lease_owner=None, lease_expires_at=None, pending_approval=None)
        if output is not None:
            values["output"] = output
        self.finish = values
        data: dict[str, Any] = {"status": status, "reason": reason}
        if output is not None:
            data["output"] = output
        self.add_event(f"run.{status}", data)


@dataclass(frozen=True)
class Committed:
    """What a commit numbered: the first event's and the first message's sequence numbers."""

    first_event_seq: int
    first_message_seq: int
    at: datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


# Built once: a statement object keeps its cache key, so each execution skips building and compiling SQL.
_RUNS, _SESSIONS, _STEPS = Run.__table__, Session.__table__, Step.__table__
_FENCE = (_RUNS.c.id == bindparam("b_run")) & (_RUNS.c.lease_owner == bindparam("b_owner"))
_ADVANCE = {
    "lease_expires_at": bindparam("b_lease"),
    "next_event_seq": _RUNS.c.next_event_seq + bindparam("b_events"),
    "steps_taken": _RUNS.c.steps_taken + bindparam("b_steps"),
    "prompt_tokens": _RUNS.c.prompt_tokens + bindparam("b_prompt"),
    "completion_tokens": _RUNS.c.completion_tokens + bindparam("b_completion"),
    "cost_usd": _RUNS.c.cost_usd + bindparam("b_cost"),
}
_FINISH = {
    "status": bindparam("b_status"),
    "status_reason": bindparam("b_reason"),
    "output": func.coalesce(bindparam("b_output", type_=_RUNS.c.output.type), _RUNS.c.output),
    "finished_at": bindparam("b_now"),
    "lease_owner": None,
    "lease_expires_at": None,
    "pending_approval": None,
}
_ADVANCE_RUN = (
    update(_RUNS).where(_FENCE & (_RUNS.c.status == "running")).values(_ADVANCE).returning(_RUNS.c.next_event_seq)
)
_FINISH_RUN = (
    update(_RUNS)
    .where(_FENCE & (_RUNS.c.status == "running"))
    .values({**_ADVANCE, **_FINISH})
    .returning(_RUNS.c.next_event_seq)
)
_NUMBER_MESSAGES = (
    update(_SESSIONS)
    .where(_SESSIONS.c.id == bindparam("b_session"))
    .values(next_message_seq=_SESSIONS.c.next_message_seq + bindparam("b_count"), updated_at=bindparam("b_now"))
    .returning(_SESSIONS.c.next_message_seq)
)
_INSERT_MESSAGES = insert(Message.__table__)
_INSERT_EVENTS = insert(Event.__table__)
_COMPLETE_STEP = (
    update(_STEPS)
    .where(
        (_STEPS.c.run_id == bindparam("b_run"))
        & (_STEPS.c.turn == bindparam("b_turn"))
        & (_STEPS.c.kind == bindparam("b_kind"))
        & (_STEPS.c.call_id == bindparam("b_call"))
    )
    .values(
        status=bindparam("b_status"),
        output=bindparam("b_output", type_=_STEPS.c.output.type),
        error=bindparam("b_error", type_=_STEPS.c.error.type),
        prompt_tokens=bindparam("b_prompt"),
        completion_tokens=bindparam("b_completion"),
        finished_at=bindparam("b_finished"),
    )
)


def _start_steps(dialect: Any) -> Any:
    """Insert started steps; one started again (after a crash) counts one more attempt."""
    statement = dialect.insert(_STEPS)
    return statement.on_conflict_do_update(
        index_elements=["run_id", "turn", "kind", "call_id"],
        set_={"attempts": _STEPS.c.attempts + 1, "status": "started", "started_at": statement.excluded.started_at},
    )


_START_STEPS = {"sqlite": _start_steps(sqlite), "postgresql": _start_steps(postgresql)}


def write_batch(
    conn: Connection,
    run_id: str,
    session_id: str,
    owner: str,
    lease_s: float,
    batch: RunBatch,
    now: datetime | None = None,
) -> Committed:
    """The batch as one transaction on `conn` (sync API), fenced on `owner`'s lease of the run, which it extends
    to `lease_s` after `now` (the store's clock)."""
    now = now or utcnow()
    counters = batch.counters
    params: dict[str, Any] = {
        "b_run": run_id,
        "b_owner": owner,
        "b_lease": now + timedelta(seconds=lease_s),
        "b_events": len(batch.events),
        "b_steps": int(counters.get("steps_taken", 0)),
        "b_prompt": int(counters.get("prompt_tokens", 0)),
        "b_completion": int(counters.get("completion_tokens", 0)),
        "b_cost": float(counters.get("cost_usd", 0.0)),
    }
    statement = _ADVANCE_RUN
    if batch.finish is not None:
        finish = batch.finish
        statement = _FINISH_RUN
        params.update(
            b_status=finish["status"], b_reason=finish["status_reason"], b_output=finish.get("output"), b_now=now
        )
    row = conn.execute(statement, params).first()
    if row is None:
        raise LeaseLost(run_id)
    first_event = row[0] - len(batch.events) + 1
    first_message = 0
    if batch.messages:
        count = len(batch.messages)
        numbered = conn.execute(_NUMBER_MESSAGES, {"b_session": session_id, "b_count": count, "b_now": now})
        first_message = numbered.scalar_one() - count + 1
        rows = [
            {"session_id": session_id, "seq": first_message + i, "run_id": run_id, "role": m.role, "data": m.data,
             "created_at": m.created_at}
            for i, m in enumerate(batch.messages)
        ]  # fmt: skip
        conn.execute(_INSERT_MESSAGES, rows)
    if batch.starts:
        conn.execute(_START_STEPS[conn.dialect.name], [{"run_id": run_id, **start} for start in batch.starts])
    if batch.completions:
        conn.execute(_COMPLETE_STEP, [{"b_run": run_id, **c} for c in batch.completions])
    if batch.events:
        rows = [
            {"run_id": run_id, "seq": first_event + i, "type": type_, "data": data, "created_at": now}
            for i, (type_, data) in enumerate(batch.events)
        ]
        conn.execute(_INSERT_EVENTS, rows)
    return Committed(first_event, first_message, now)


def _json_text(value: Any) -> str:
    """JSON columns' text, as the stdlib would write it (non-string keys become strings), at orjson's speed."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


class _SyncEngineView:
    """`attach_keyring` takes an AsyncEngine and only uses its `.sync_engine`: this engine is one already."""

    def __init__(self, engine: Engine) -> None:
        self.sync_engine = engine


class JournalWriter:
    """Runs `write_batch` in a transaction: on a SQLite file in its own thread on the stdlib driver, otherwise on the
    async engine. The thread is the only user of its connection, so SQLite sees one more ordinary writer."""

    def __init__(self, db: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock
        self._engine: Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._closed = False
        database = db.url.database
        if db.is_sqlite and database and database != ":memory:":
            self._engine = create_engine(db.url.set(drivername="sqlite"), json_serializer=_json_text)
            event.listen(self._engine, "connect", _sqlite_pragmas)
            event.listen(self._engine, "begin", _sqlite_begin)
            attach_keyring(_SyncEngineView(self._engine), db.keyring)  # type: ignore[arg-type]

    async def write(self, run_id: str, session_id: str, owner: str, lease_s: float, batch: RunBatch) -> Committed:
        if self._closed:  # e.g. a tool call still running after its run's task ended, past shutdown
            raise JournalClosed(f"the run journal is closed; run {run_id}'s batch was not written")
        if self._engine is None:
            async with self.db.engine.begin() as conn:
                return await conn.run_sync(write_batch, run_id, session_id, owner, lease_s, batch, self.clock())
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="strata-run-journal")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._write, run_id, session_id, owner, lease_s, batch)

    def _write(self, run_id: str, session_id: str, owner: str, lease_s: float, batch: RunBatch) -> Committed:
        assert self._engine is not None
        with self._engine.begin() as conn:
            return write_batch(conn, run_id, session_id, owner, lease_s, batch, self.clock())

    def refuse_writes(self) -> None:
        """From now on `write` raises `JournalClosed` (call it on the event loop, before `close`)."""
        self._closed = True

    def close(self) -> None:
        """Refuse further writes (`JournalClosed`), then stop the thread once its last write is done."""
        self._closed = True
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._engine is not None:
            self._engine.dispose()
