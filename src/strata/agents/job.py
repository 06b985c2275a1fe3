"""One execution of a run: the agent's function (the built-in tool-calling agent or a code agent's `entrypoint:`)
re-entered over a run context whose journal is the run's step rows and whose ports are the engine's model
dispatcher, tools, approvals and child runs. One driver, one way a step is written, one way a run ends.

Writes go into the job's `RunBatch` and are committed in fenced transactions, in order, each step's before the next
side effect: before a tool call or a step of code acts, everything before it is written (`durable`). A model call
has no side effect, so the write before it (its start, with the previous tool result) goes on while the model
works (`flush`), off the step's critical path; a model step's result is written with the start of the tool calls
it asked for, in one transaction. A code agent's completed call is written before it returns to the function.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from strata.agents.approvals import binding, call_binding, unique_call_ids
from strata.agents.bus import LiveEvent
from strata.agents.durable.context import RunContext, StepFailed
from strata.agents.durable.entrypoint import EntrypointError, load_entrypoint
from strata.agents.durable.journal import Entry, NonDeterminism
from strata.agents.durable.ports import ApprovalDecision, ChildResult, ModelReply, ModelRequest, Suspended, ToolOutput
from strata.agents.guards import GuardTripped, limit_reached, permitted_models
from strata.agents.model_call import DeadlineExceeded, ModelStepError
from strata.agents.tool_agent import ToolAgent, tool_message
from strata.agents.tool_call import traced_invoke
from strata.agents.tools.base import Tool
from strata.config import AgentConfig
from strata.observability import tracing_genai as genai
from strata.observability.tracing import INVALID_SPAN, Span, fail
from strata.store.run_journal import JournalClosed, LeaseLost, RunBatch
from strata.store.runs import TERMINAL, aware, finish, utcnow
from strata.store.tables import Message, Run

if TYPE_CHECKING:
    from strata.agents.catalog import AgentCatalog
    from strata.agents.engine import RunEngine

log = structlog.get_logger("strata.engine")
# Raised through the agent's function by the engine's own ports: ended by `RunEngine` as for any agent.
ENGINE_ERRORS = (ModelStepError, DeadlineExceeded, LeaseLost, JournalClosed)


class Stop(Exception):
    """The run reached a terminal state or paused; nothing more to do now."""


class Job:
    """Drives one run's agent function; ends, pauses or fails the run as the function's outcome says."""

    def __init__(self, engine: RunEngine, run: Run, owner: str, spec: AgentConfig, span: Span = INVALID_SPAN) -> None:
        self.engine = engine
        self.store = engine.store
        self.run = run
        self.owner = owner
        self.spec = spec
        self.span = span  # the run's invoke_agent span
        self.tools: dict[str, Tool] = {t.name: t for t in engine.tools.for_agent(spec)}
        # The models this run may call: its key's allow-list holds for every step and for the fallback.
        self.models, refused = permitted_models(spec, run.allowed_models)
        self.refused_model = spec.model if spec.model in refused else None
        self.allowed = None if run.allowed_models is None else frozenset(run.allowed_models)
        self.fallback_note = "".join(
            f" (fallback {m!r} not tried: this run's API key may not use it)" for m in refused if m != spec.model
        )
        self.deadline = time.monotonic() + (aware(run.deadline_at) - utcnow()).total_seconds()
        self.history: list[Message] = []  # the session's messages, in order (the last ones maybe not yet committed)
        self.batch = RunBatch()
        self.writing: asyncio.Future[None] | None = None  # the last write started, if any (each waits for the last)
        self.ended = False  # the run's end was committed by `end`

    # -- writes ----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Start writing the batch (one fenced transaction, after the writes before it) without waiting for it: a
        model call goes on meanwhile (it has no side effects). `commit` and `durable` wait for it."""
        if not self.batch:
            return
        batch, self.batch = self.batch, RunBatch()
        write = asyncio.ensure_future(self._write(batch, self.writing))
        write.add_done_callback(_retrieved)
        self.writing = write

    async def _write(self, batch: RunBatch, previous: asyncio.Future[None] | None) -> None:
        if previous is not None:
            await previous  # in order; a failed one (a lost lease) fails those after it
        await self.store.commit(self.run, self.owner, self.engine.lease_s, batch)

    async def commit(self) -> None:
        """Write the batch now and wait for every write so far; raises `LeaseLost` if another worker has the run."""
        self.flush()
        await self._written()

    async def durable(self) -> None:
        """Before a side effect: what came before it (a model step's result) is written."""
        if self.batch.completions or self.batch.messages or self.batch.counters:
            self.flush()
        await self._written()

    async def _written(self) -> None:
        write = self.writing
        if write is not None:
            await write
            if self.writing is write:
                self.writing = None

    async def settle(self) -> None:
        """Wait, through a cancellation, for the writes in flight: what follows (an end, a release of the run) must
        come after them, never race them on another connection. Their errors are not this call's to raise."""
        write = self.writing
        if write is None:
            return
        cancelled = False
        while not write.done():
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                cancelled = True
            except Exception:  # raised to whoever waits for it (`commit`), not here
                pass
        if cancelled:
            raise asyncio.CancelledError

    async def end(self, status: str, reason: str | None, output: str | None = None) -> None:
        self.batch.end(status, reason, output)
        try:
            await self.commit()
        finally:  # ended even if this task was cancelled while the end was written (the commit finishes it)
            if self.run.status == status:
                self.ended = True
                self.engine.accounting.run_finished(self.run)
                record_end(self.span, self.run, status, reason)
        await self.engine.wake_parent(self.run)

    async def stop(self, status: str, reason: str | None, output: str | None = None) -> None:
        await self.end(status, reason, output)
        raise Stop

    # -- the driver ------------------------------------------------------------------------------

    async def drive(self) -> None:
        builtin = not self.spec.entrypoint
        function: Any
        try:
            function = None if builtin else load_entrypoint(self.spec.entrypoint or "")
        except EntrypointError as exc:
            await self.stop("failed", str(exc))
        # Read once: while this worker holds the lease, only this run writes the session's messages (a session
        # runs one run at a time), so each step appends what it wrote instead of reading them all back.
        self.history = await self.store.messages(self.run.session_id)
        resumed = await self._begin()
        journal = _ToolAgentJournal(self) if builtin else _CodeJournal(self)
        schemas = [tool.spec.openai_schema() for tool in self.tools.values()]
        if builtin:
            earlier = [m.data for m in self.history if m.run_id != self.run.id] + [self.run.input]
            function = ToolAgent(self.spec, schemas, earlier, self._needs_approval, self._decision)
        recorded = await journal.load() if resumed else []
        ctx = RunContext(self.run.id, journal, _EnginePorts(self), recorded, input_=self.run.input, tools=schemas)
        try:
            result = await function(ctx)
            ctx.check_finished()
        except Suspended as waiting:
            await self._pause(waiting)
        except NonDeterminism as exc:
            await self.stop("failed", f"non-determinism: {exc}")
        except GuardTripped as exc:
            await self.stop("failed", str(exc))
        except StepFailed as exc:
            await self.stop("failed", f"agent error: {exc}")
        except (Stop, *ENGINE_ERRORS):
            raise  # the engine's own (a model step that failed, a lost lease): `RunEngine` ends the run
        except Exception as exc:
            if builtin:
                raise  # a bug or a malformed backend reply: `RunEngine` ends the run as an internal error
            await self.stop("failed", f"agent error: {type(exc).__name__}: {exc}")  # the agent's code raised
        output = result if isinstance(result, str) else "" if result is None else orjson.dumps(result).decode()
        if not builtin:  # the built-in agent's answer is its last model message, already in the session
            self.history.append(
                self.batch.add_message(self.run.session_id, self.run.id, {"role": "assistant", "content": output})
            )
        await self.stop("completed", None, output)

    async def _begin(self) -> bool:
        """Start (or resume) the run; True when it ran before (its journal may hold steps)."""
        run = self.run  # as claimed, so its cancel flag is fresh
        if run.cancel_requested:
            await self.stop("cancelled", "cancelled by request")
        if any(m.run_id == run.id for m in self.history):
            self.batch.add_event("run.resumed", {"attempt": run.attempts})
            return True
        # first pick-up: the user's message joins the session now, in order
        self.history.append(self.batch.add_message(run.session_id, run.id, run.input))
        self.batch.add_event("run.started", {"agent": run.agent, "version": run.agent_version})
        return False

    def _needs_approval(self, name: str) -> bool:
        tool = self.tools.get(name)
        return name in self.spec.require_approval or bool(tool and tool.spec.requires_approval)

    def _decision(self, turn: int, call: dict[str, Any]) -> dict[str, Any] | None:
        return (self.run.approvals or {}).get(call_binding(self.run.id, turn, call))

    def admit_model(self, model: str | None) -> None:
        """Before a model step acts: the run's limits and its key's allowed models (`GuardTripped` if not)."""
        reason = limit_reached(self.spec, self.run)
        if reason:
            raise GuardTripped(reason)
        if model is not None:
            if self.allowed is not None and model not in self.allowed:
                raise GuardTripped(f"model not allowed: this run's API key may not use model {model!r}")
        elif self.refused_model is not None:
            raise GuardTripped(f"model not allowed: this run's API key may not use model {self.refused_model!r}")

    # -- pauses ----------------------------------------------------------------------------------

    async def _pause(self, waiting: Suspended) -> None:
        if waiting.reason == "child":
            await self._wait_for_children()
        requested = [w if "binding" in w else self._requested(w) for w in waiting.waiting_for]
        await self._pause_for(requested)

    def _requested(self, w: dict[str, Any]) -> dict[str, Any]:
        """A code agent's `ctx.approval` as approvers see it (the built-in agent's calls come as they are shown)."""
        return {
            "id": w["key"], "name": w["name"], "arguments": orjson.dumps(w["payload"]).decode(),
            "turn": _position(w["key"]), "binding": _binding(self.run.id, w["key"], w["name"], w["payload"]),
        }  # fmt: skip

    async def _wait_for_children(self) -> None:
        """Give the worker slot back until the children end (they may need it: a fan-out wider than the workers);
        the last child to end queues this run again, which then replays up to its children's results."""
        await self.commit()  # what the run did so far (the children's starts), before it waits
        run = await self.store.wait_for_children(self.run.id, self.owner)
        if run is None:
            record_end(self.span, self.run, "cancelled", "cancelled by request")
        else:
            record_end(self.span, run, "waiting", None)
        raise Stop

    async def _pause_for(self, requested: list[dict[str, Any]]) -> None:
        """Wait for approvers to decide on `requested` (entries as `approvals.pending_entry` makes them)."""
        await self.commit()  # what the run did so far, before it waits
        async with self.store.unit(run_id=self.run.id, owner=self.owner, lease_s=self.engine.lease_s) as unit:
            run = await unit.tx.get(Run, self.run.id, populate_existing=True)
            assert run is not None
            self.run = run
            if run.cancel_requested:  # asked while running: never leave it waiting for an approver
                await finish(unit, run, "cancelled", "cancelled by request")
                record_end(self.span, run, "cancelled", "cancelled by request")
                raise Stop
            run.status = "awaiting_approval"
            run.pending_approval = requested
            run.lease_owner = None
            run.lease_expires_at = None
            await unit.add_event(run.id, "approval.requested", {"calls": requested})
        record_end(self.span, run, "awaiting_approval", None)
        raise Stop

    # -- live events -----------------------------------------------------------------------------

    def delta(self, text: str, turn: int) -> None:
        self.engine.bus.publish(LiveEvent(self.run.id, "message.delta", {"content": text, "turn": turn}, None))

    async def waiting(self, reason: str, delay_s: float) -> None:
        async with self.store.unit(run_id=self.run.id, owner=self.owner, lease_s=self.engine.lease_s) as unit:
            await unit.add_event(self.run.id, "run.waiting", {"reason": reason, "retry_in_s": round(delay_s, 3)})

    def fallback(self, failed: str, fallback: str, error: str) -> None:
        """The dispatcher's chain moved on to the agent's fallback model: written with the step's result."""
        self.batch.add_event("run.fallback", {"from": failed, "to": fallback, "error": error})


def _retrieved(write: asyncio.Future[None]) -> None:
    """A write's error is raised to whoever waits for it; if nobody does (the run was stopped), it is not lost."""
    if not write.cancelled() and (error := write.exception()) and not isinstance(error, LeaseLost | JournalClosed):
        log.warning("a run's write failed", exc_info=error)


def record_end(span: Span, run: Run, status: str, reason: str | None) -> None:
    """How the run ended, on its invoke_agent span: status, the run's tokens so far, the failure."""
    if not span.is_recording():
        return
    span.set_attributes(
        {
            genai.RUN_STATUS: status,
            genai.INPUT_TOKENS: run.prompt_tokens,
            genai.OUTPUT_TOKENS: run.completion_tokens,
        }
    )
    if status == "failed":
        # The reason's head names the guard or failure: "timeout", "step limit", "model error", ...
        fail(span, error_type=(reason or "failed").split(":", 1)[0].strip()[:64], message=reason or "")


def _position(key: str) -> int:
    """A model call's or a code agent's call's position, from its key (`run:position`)."""
    return int(key.rsplit(":", 1)[1])


def _binding(run_id: str, key: str, name: str, payload: dict[str, Any]) -> str:
    return binding(run_id, _position(key), key, name, orjson.dumps(payload, option=orjson.OPT_SORT_KEYS).decode())


# -- journals: entries as step rows ----------------------------------------------------------------


class _ToolAgentJournal:
    """The built-in agent's entries as it has always shown its steps: a model step at its turn (input: how many
    messages and which tools; output: the assistant message), a tool call at its turn and call id (input: its
    arguments; output: content and error flag), each with its session message and events."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.running = 0  # tool calls started and not yet completed

    async def load(self) -> list[Entry]:
        """Positions are rebuilt from the rows: a model step, then its calls in the order its message made them."""
        steps = await self.job.store.steps(self.job.run.id)
        tools = {(s.turn, s.call_id): s for s in steps if s.kind == "tool"}
        entries, seq = [], 0
        for step in sorted((s for s in steps if s.kind == "model"), key=lambda s: s.turn):
            done = step.status != "started"
            output = None
            if done:
                output = {
                    "message": step.output, "model": step.name, "prompt_tokens": step.prompt_tokens,
                    "completion_tokens": step.completion_tokens, "cost_usd": 0.0,
                }  # fmt: skip
            entries.append(Entry(seq, "model", "agent", None, "completed" if done else "started", output=output,
                                 turn=step.turn))  # fmt: skip
            calls = (step.output or {}).get("tool_calls") or [] if done else []
            for index, call in enumerate(calls):
                row = tools.get((step.turn, call["id"]))
                if row is not None:
                    status = "started" if row.status == "started" else "completed"
                    entries.append(Entry(seq + 1 + index, "tool", row.name, None, status, output=row.output,
                                         turn=step.turn, call_id=row.call_id))  # fmt: skip
            seq += 1 + len(calls)
        return entries

    async def start(self, entry: Entry) -> None:
        job, batch = self.job, self.job.batch
        if entry.kind == "model":
            job.admit_model(None)
            batch.start_step(turn=entry.position, kind="model", name=job.spec.model, input_=entry.data)
            batch.add_event("step.started", {"turn": entry.position, "kind": "model", "model": job.spec.model})
            job.flush()  # with the last tool result, while the model works: followers see the step start
            return
        batch.start_step(
            turn=entry.position, kind="tool", name=entry.name, call_id=entry.call_id, input_=entry.data,
            idempotency_key=f"{job.run.id}:{entry.key}",
        )  # fmt: skip
        batch.add_event(
            "step.started", {"turn": entry.position, "kind": "tool", "tool": entry.name, "call_id": entry.call_id}
        )
        self.running += 1
        await job.durable()

    async def complete(self, entry: Entry) -> None:
        job, batch, run = self.job, self.job.batch, self.job.run
        turn, output = entry.position, entry.output
        if entry.kind == "model":
            message = output["message"]
            tokens = {"prompt_tokens": output["prompt_tokens"], "completion_tokens": output["completion_tokens"]}
            batch.complete_step(turn=turn, kind="model", output=message, **tokens)
            job.history.append(batch.add_message(run.session_id, run.id, message))
            batch.add_event(
                "message.completed",
                {"turn": turn, "model": output["model"], "message": message, "usage": tokens,
                 "cost_usd": output["cost_usd"]},
            )  # fmt: skip
            for call in message.get("tool_calls") or ():
                function = call["function"]
                batch.add_event(
                    "tool.called",
                    {"call_id": call["id"], "tool": function["name"], "arguments": function["arguments"],
                     "idempotency_key": f"{run.id}:{turn}:{call['id']}"},
                )  # fmt: skip
            return  # written with the next step's start (before any tool runs) or the run's end
        result = ToolOutput(**output)
        batch.complete_step(
            turn=turn, kind="tool", call_id=entry.call_id, status="failed" if result.is_error else "completed",
            output=output, error=result.content if result.is_error else None,
        )  # fmt: skip
        job.history.append(batch.add_message(run.session_id, run.id, tool_message(entry.call_id, result)))
        batch.add_event(
            "tool.result",
            {"call_id": entry.call_id, "tool": entry.name, "content": result.content, "is_error": result.is_error},
        )
        self.running -= 1
        if self.running:  # others of this turn still run: make this result durable now
            job.flush()
        # else: the last one's result is written with the next step's start


class _CodeJournal:
    """A code agent's entries as step rows (`turn` = the entry's position, `kind` = the primitive, `input` = its
    fingerprint and start data, `output` = its result): one transaction per call, written when the call completed
    and before it returns (its start rides along), except a model call's start, written while the model works
    (followers stream a model step's text once its start is stored), and a sleep's, written before it sleeps (its
    wake-up time must be durable)."""

    def __init__(self, job: Job) -> None:
        self.job = job

    async def load(self) -> list[Entry]:
        entries = []
        for step in await self.job.store.steps(self.job.run.id):
            stored = step.input or {}
            output = (step.output or {}).get("value")
            entries.append(
                Entry(step.turn, step.kind, step.name, stored.get("fingerprint", ""), step.status,
                      stored.get("data") or {}, output, step.error)
            )  # fmt: skip
        return sorted(entries, key=lambda e: e.seq)

    async def start(self, entry: Entry) -> None:
        job = self.job
        if entry.kind == "model":
            job.admit_model(None if entry.name == "agent" else entry.name)
        job.batch.start_step(
            turn=entry.position, kind=entry.kind, name=entry.name,
            input_={"fingerprint": entry.fingerprint, "data": entry.data},
            idempotency_key=f"{job.run.id}:{entry.key}" if entry.kind == "tool" else None,
        )  # fmt: skip
        started = {"turn": entry.position, "kind": entry.kind, "name": entry.name}
        if entry.kind in ("model", "tool"):  # as the built-in agent's events name them
            started[entry.kind] = entry.name
        job.batch.add_event("step.started", started)
        if entry.kind == "model":
            job.flush()  # while the model works: followers see the step start
        elif entry.kind == "sleep":
            await job.commit()  # its wake-up time
        else:
            await job.durable()  # a side effect: what came before it is written first

    async def complete(self, entry: Entry) -> None:
        job, batch = self.job, self.job.batch
        usage = {}
        if entry.kind == "model":
            usage = {
                "prompt_tokens": entry.output["prompt_tokens"],
                "completion_tokens": entry.output["completion_tokens"],
            }
        batch.complete_step(
            turn=entry.position, kind=entry.kind, status=entry.status, output={"value": entry.output},
            error=entry.error, **usage,
        )  # fmt: skip
        if entry.kind == "model":
            output = entry.output
            completed = {"turn": entry.position, "model": output["model"], "message": output["message"], "usage": usage}
            batch.add_event("message.completed", {**completed, "cost_usd": output["cost_usd"]})
        elif entry.kind == "tool":
            batch.add_event("tool.result", {"call_id": f"{job.run.id}:{entry.key}", "tool": entry.name,
                                            **entry.output})  # fmt: skip
        else:
            batch.add_event("step.completed", {"turn": entry.position, "kind": entry.kind, "name": entry.name,
                                               "status": entry.status})  # fmt: skip
        await job.commit()  # before the call returns: the function's code after it may act on the result


# -- ports: what the context calls ----------------------------------------------------------------


class _EnginePorts:
    """What an agent's context calls: the engine's model dispatcher, tools, approvals and runs."""

    def __init__(self, job: Job) -> None:
        self.job = job

    async def model(self, request: ModelRequest, key: str) -> ModelReply:
        job, run = self.job, self.job.run
        job.admit_model(request.model)  # again: a step started before a crash is made again
        models = job.models if request.model is None else [request.model]
        turn = _position(key)
        started = time.monotonic()
        outcome = await job.engine.caller.call(
            agent=job.spec.name, models=models, allowed=job.allowed, messages=request.messages, tools=request.tools,
            temperature=request.temperature if request.temperature is not None else job.spec.temperature,
            max_tokens=request.max_tokens or job.spec.max_tokens_per_step, deadline=job.deadline,
            call_id=str(turn), on_delta=lambda text: job.delta(text, turn), on_wait=job.waiting,
            on_fallback=job.fallback,
        )  # fmt: skip
        latency = time.monotonic() - started
        unique_call_ids(outcome.message)
        accounting, use = job.engine.accounting, outcome.use
        cost = accounting.step_cost(use)
        counters = {"steps_taken": 1, "prompt_tokens": outcome.prompt_tokens,
                    "completion_tokens": outcome.completion_tokens, "cost_usd": cost}  # fmt: skip
        for name, delta in counters.items():  # at once: the next step's limit checks see them
            setattr(run, name, getattr(run, name) + delta)
        job.batch.count(**counters)
        # Usage is settled once the step is durable: a step lost to a crash is made again, and billed once.
        job.batch.after.append(lambda: accounting.model_step(run, use, latency, cost))
        return ModelReply(outcome.message, outcome.model, outcome.prompt_tokens, outcome.completion_tokens, cost)

    async def tool(self, name: str, arguments: dict[str, Any] | str, key: str) -> ToolOutput:
        job = self.job
        text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
        call_id = key[len(job.run.id) + 1 :].partition(":")[2] or key  # a model's call id, else the key
        result, outcome = await traced_invoke(job.engine.tracing, job.tools, job.run.id, name, call_id, text, key)
        job.engine.accounting.tool_called(name, outcome)
        return ToolOutput(result.content, result.is_error)

    async def refuse(self, name: str, message: str, key: str) -> ToolOutput:
        self.job.engine.accounting.tool_called(name, "denied")
        return ToolOutput(message, True)

    async def approval(self, name: str, payload: dict[str, Any], key: str) -> ApprovalDecision | None:
        decision = (self.job.run.approvals or {}).get(_binding(self.job.run.id, key, name, payload))
        if decision is None:
            return None
        return ApprovalDecision(
            decision.get("decision") == "approve", decision.get("comment"), decision.get("arguments")
        )

    async def child(self, agent: str, input_: dict[str, Any], key: str) -> ChildResult | None:
        """The child's result once it ended; None while it runs (the parent then waits without its worker)."""
        job = self.job
        child = await _start_child(job, job.engine.catalog, agent, input_, f"child\x1f{key}")
        if child.status not in TERMINAL:
            return None
        return ChildResult(child.id, child.status, child.output)


async def _start_child(job: Job, catalog: AgentCatalog, agent: str, message: dict[str, Any], key: str) -> Any:
    """The child run of this key: found if an earlier execution made it, else made now (queued for any worker)."""
    run, store = job.run, job.store
    existing = await store.by_idempotency_key(agent, key)
    if existing is not None:
        return existing
    version, spec = await catalog.latest(agent)
    session = store.new_session(agent, run.owner, {"parent_run": run.id})
    child, _ = await store.create_run(
        session_id=session.id, agent=agent, agent_version=version, owner=run.owner, input_message=message,
        idempotency_key=key, timeout_s=spec.limits.timeout_s, trace_parent=run.trace_parent, key_id=run.key_id,
        allowed_models=run.allowed_models, new_session=session, model=spec.model, parent_run_id=run.id,
    )  # fmt: skip
    return child
