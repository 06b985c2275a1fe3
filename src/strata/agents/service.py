"""What the API asks of the agent runtime: start runs (with idempotency and the session's
double-texting policy), wait for them, follow their events, cancel, approve."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from strata.agents.bus import EventBus, LiveEvent, Subscription
from strata.agents.catalog import AgentCatalog, UnknownAgent
from strata.agents.worker import RunWorker
from strata.observability.tracing import traceparent
from strata.store.runs import TERMINAL, RunStore, StaleApproval, binding_key
from strata.store.tables import Run, Session, Step

STORE_POLL_S = 1.0  # how often followers re-read the store for events written by other replicas
FINAL_EVENTS = ("run.completed", "run.failed", "run.cancelled")
SETTLING_EVENTS = (*FINAL_EVENTS, "approval.requested")  # what a synchronous waiter waits for


class RunConflict(Exception):
    """The session already has a run going and its policy is `reject`; or the run is not in the state a request
    needs (`code` says which)."""

    def __init__(self, message: str, active_run: str, code: str = "run_in_progress") -> None:
        super().__init__(message)
        self.active_run = active_run
        self.code = code


class NotFound(LookupError):
    pass


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Forbidden(InvalidRequest):
    """403: a well-formed request this caller may not make (say, its key may not use the agent's model)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ApprovalDecision:
    decision: Literal["approve", "deny"]
    call_id: str | None = None
    arguments: dict[str, Any] | None = None
    comment: str | None = None
    binding: str | None = None  # the pending call's binding, as the approver was shown it


class AgentService:
    def __init__(self, store: RunStore, catalog: AgentCatalog, worker: RunWorker, bus: EventBus) -> None:
        self.store = store
        self.catalog = catalog
        self.worker = worker
        self.bus = bus

    async def create_session(self, agent: str, owner: str | None, metadata: dict[str, Any] | None) -> Session:
        await self.agent(agent)
        return await self.store.create_session(agent, owner, metadata)

    async def session(self, session_id: str) -> Session:
        session = await self.store.get_session(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}")
        return session

    async def start_run(
        self,
        agent: str,
        message: dict[str, Any],
        *,
        session_id: str | None,
        idempotency_key: str | None,
        owner: str | None,
        wake: bool = True,
        key_id: str | None = None,
        models: frozenset[str] | None = None,
    ) -> tuple[Run, bool]:
        """`wake=False`: the caller wakes the worker itself, once it has subscribed to the run.
        `models`: those the caller's key may use (None: any); the run is held to them, its fallback too."""
        version, spec = await self.agent(agent)
        if models is not None and spec.model not in models:
            raise Forbidden(
                f"this key may not use model {spec.model!r}, the model of agent {agent!r}", "model_not_allowed"
            )
        if idempotency_key:
            # Scoped to the caller: one user's key never finds, nor collides with, another's (a refusal would tell
            # them it exists). Stored only as a keyed hash (store/idempotency.py), owner and key alike.
            idempotency_key = scoped_idempotency_key(owner, idempotency_key)
            existing = await self.store.by_idempotency_key(agent, idempotency_key)
            if existing is not None:
                return existing, False
        new_session: Session | None = None
        if session_id is None:  # created with the run, in its transaction
            session = new_session = self.store.new_session(agent, owner, None)
        else:
            session = await self.session(session_id)
            if session.owner != owner:  # someone else's conversation: as if it did not exist
                raise NotFound(f"no session {session_id!r}")
            if session.agent != agent:
                raise InvalidRequest(
                    f"session {session_id!r} belongs to agent {session.agent!r}, not {agent!r}", "session_id"
                )
            for active in await self.store.active_runs(session.id):
                if spec.double_texting == "reject":
                    raise RunConflict(
                        f"session {session.id!r} has run {active.id!r} in progress ({active.status}); "
                        "wait for it, cancel it, or configure double_texting: enqueue or interrupt",
                        active.id,
                    )
                if spec.double_texting == "interrupt":
                    await self.cancel(active.id)
        # The hand-off: a run opening a new conversation, while this replica's worker has a free slot, is created
        # already claimed by it and started at once (no wake-up, no claim transaction).
        handoff = wake and new_session is not None and self.worker.serves(spec.model) and self.worker.reserve()
        token = self.worker.claim_token() if handoff else None
        try:
            run, created = await self.store.create_run(
                session_id=session.id,
                agent=agent,
                agent_version=version,
                owner=owner,
                input_message=message,
                idempotency_key=idempotency_key,
                timeout_s=spec.limits.timeout_s,
                trace_parent=traceparent(),  # the request's span: the run's spans join its trace
                key_id=key_id,
                allowed_models=sorted(models) if models is not None else None,
                new_session=new_session,
                claim_for=(token, self.worker.lease_s) if token is not None else None,
                model=spec.model,
            )
        except BaseException:
            if handoff:
                self.worker.unreserve()
            raise
        if handoff:
            if not created:  # an idempotent retry: the run that exists is the answer; it was not created here
                self.worker.unreserve()
            elif not self.worker.adopt(run):  # the worker stopped meanwhile: back to the queue for another
                await self.store.release(run.id, token)
                run = await self.run(run.id)
        elif created and wake:
            self.worker.wake()
        return run, created

    async def run(self, run_id: str) -> Run:
        run = await self.store.get_run(run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r}")
        return run

    async def wait(self, run_id: str, timeout_s: float) -> Run:
        """Until the run ends or pauses for approval, or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        with self.bus.subscribe(run_id) as queue:
            while True:
                run = await self.run(run_id)
                remaining = deadline - time.monotonic()
                if run.status in TERMINAL or run.status == "awaiting_approval" or remaining <= 0:
                    return run
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_next_settling(queue), min(remaining, STORE_POLL_S))

    async def wait_answer(self, run_id: str, timeout_s: float) -> tuple[Run, list[Step]]:
        """`wait`, then the run's steps: what a synchronous request answers with. A run this replica's worker is
        executing is not read back: the worker hands over the run as it ended it, and only its steps are read."""
        ended = self.worker.ended(run_id)
        if ended is not None:
            deadline = time.monotonic() + timeout_s
            final: Run | None = None
            with contextlib.suppress(TimeoutError):
                final = await asyncio.wait_for(asyncio.shield(ended), timeout_s)
            if final is not None:
                return final, await self.store.steps(run_id)
            timeout_s = max(0.0, deadline - time.monotonic())
        run = await self.wait(run_id, timeout_s)
        return run, await self.store.steps(run_id)

    def subscribe(self, run_id: str) -> Subscription:
        """Subscribe before the run can start (no await in between) to see its very first deltas."""
        return self.bus.subscribe(run_id)

    async def follow(
        self,
        run_id: str,
        after_seq: int = 0,
        *,
        deltas: bool = True,
        subscription: Subscription | None = None,
    ) -> AsyncIterator[LiveEvent]:
        """Stored events after `after_seq`, then live ones, until the run ends (through approval pauses)."""
        if self._finished_before(await self.run(run_id), after_seq):
            return  # a client resuming after the final event: nothing more will come
        last = after_seq
        # The latest model turn whose step.started went out (to this client, before it resumed, too): its
        # deltas may follow it.
        started = await self.store.turn_started(run_id, after_seq)
        held: list[LiveEvent] = []  # deltas of a turn whose step.started has not been read back yet
        with subscription or self.bus.subscribe(run_id) as queue:
            while True:
                # Deltas are live only; stored events are read back. A batch read from the store may
                # cover several turns, so each turn's deltas go out just before its message.completed;
                # deltas that arrive before their turn's step.started was read (the next step can start
                # while this loop reads) wait for it.
                stored_batch = await self.store.events_after(run_id, last)
                pending = held + [e for e in _drain(queue) if e.seq is None and deltas]
                for stored in stored_batch:
                    turn = stored.data.get("turn", 0)
                    if stored.type == "message.completed":
                        for delta in [d for d in pending if d.data.get("turn", 0) <= turn]:
                            yield delta
                        pending = [d for d in pending if d.data.get("turn", 0) > turn]
                    elif stored.type == "step.started" and stored.data.get("kind") == "model":
                        started = max(started, turn)
                    last = stored.seq
                    yield LiveEvent(run_id, stored.type, stored.data, stored.seq)
                    if stored.type in FINAL_EVENTS:
                        return
                held = [d for d in pending if d.data.get("turn", 0) > started]
                for delta in pending:
                    if delta.data.get("turn", 0) <= started:
                        yield delta
                try:
                    event = await asyncio.wait_for(queue.get(), STORE_POLL_S)
                except TimeoutError:
                    if self._finished_before(await self.run(run_id), last):
                        return
                    continue
                if event.seq is None and deltas:
                    if event.data.get("turn", 0) <= started:
                        yield event
                    else:
                        held.append(event)

    @staticmethod
    def _finished_before(run: Run, seq: int) -> bool:
        return run.status in TERMINAL and seq >= run.next_event_seq

    async def cancel(self, run_id: str) -> Run:
        """Cancel a run and, with it, the child runs it started that are still going."""
        run = await self.store.request_cancel(run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r}")
        self.worker.cancel_local(run_id)
        for child in await self.store.active_children(run_id):
            await self.cancel(child)
        if run.status in TERMINAL:
            await self.store.wake_parent(run)  # a child cancelled while its parent waits: the parent goes on
        return run

    async def approve(self, run_id: str, decision: ApprovalDecision) -> tuple[Run, list[dict[str, Any]]]:
        """Decide pending calls: the one whose `binding` is given, those with `call_id`, or all. Returns the run and
        the calls decided. A binding that names no pending call is stale (409): the run moved on since the approver
        looked, and whatever is pending now is another call that needs its own decision."""
        run = await self.run(run_id)
        if run.status != "awaiting_approval":
            raise RunConflict(f"run {run_id!r} is {run.status}, not awaiting approval", run_id, "not_awaiting_approval")
        pending = run.pending_approval or []
        targets = [
            c for c in pending if decision.call_id in (None, c["id"]) and decision.binding in (None, binding_key(c))
        ]
        if not targets and decision.binding is not None:
            raise _stale(run_id, pending)
        if not targets:
            ids = ", ".join(c["id"] for c in pending)
            raise InvalidRequest(f"no pending call {decision.call_id!r} (pending: {ids})", "call_id")
        if decision.arguments is not None and len(targets) != 1:
            raise InvalidRequest("edited arguments need the 'call_id' or 'binding' of one call", "call_id")
        record = {"decision": decision.decision, "arguments": decision.arguments, "comment": decision.comment}
        try:
            updated = await self.store.set_approvals(run_id, {binding_key(c): record for c in targets})
        except StaleApproval:  # another approval let the run move on between the read and this write
            raise _stale(run_id, (await self.run(run_id)).pending_approval or []) from None
        assert updated is not None
        self.worker.wake()
        return updated, targets

    async def agent(self, name: str) -> tuple[int, Any]:
        try:
            return await self.catalog.latest(name)
        except UnknownAgent:
            names = ", ".join(await self.catalog.names())
            raise NotFound(f"no agent {name!r} (agents: {names})") from None


def _stale(run_id: str, pending: list[dict[str, Any]]) -> RunConflict:
    now = ", ".join(f"{c['id']} ({c['name']}, binding {binding_key(c)})" for c in pending) or "none"
    return RunConflict(
        f"stale approval: the call it was made for is no longer pending in run {run_id!r}; pending now: {now}",
        run_id,
        "stale_approval",
    )


def _drain(queue: asyncio.Queue[LiveEvent]) -> list[LiveEvent]:
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


async def _next_settling(queue: asyncio.Queue[LiveEvent]) -> LiveEvent:
    """The next event after which the run may have ended or paused: the waiter reads the run only then, not
    after each of its steps' events (a read per event cost more than the steps). Events of other replicas
    never arrive here; the waiter's periodic re-read finds those runs' ends."""
    while True:
        event = await queue.get()
        if event.type in SETTLING_EVENTS:
            return event


def scoped_idempotency_key(owner: str | None, key: str) -> str:
    """The key as stored for `owner`'s runs: the owner and the client's key, which a unit separator keeps apart."""
    return f"{owner or ''}\x1f{key}"
