"""The run loop: model call -> tool calls (in parallel) -> model call ... until an answer or a limit.

The session's messages are the run's durable state. Each step is recorded `started` before it runs
and its result (message, usage, events) is committed with it before the next begins, so a run
picked up after a crash continues from its last completed step: a model call in flight is made
again (it has no side effects); a tool call whose result was committed is never executed again.

Tracing: each execution of a run is an `invoke_agent {agent}` span, a child of the request that created
the run (its `traceparent` is stored with the run, so this holds on any replica and after a resume); its
model calls are `chat {model}` spans and its tool calls `execute_tool {tool}` spans under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
import structlog

from strata.agents.approvals import call_binding, pending_entry, unique_call_ids
from strata.agents.bus import EventBus, LiveEvent
from strata.agents.catalog import AgentCatalog
from strata.agents.guards import call_signature, detect_loop, limit_reached, permitted_models
from strata.agents.model_call import DeadlineExceeded, ModelCaller, ModelStepError
from strata.agents.tool_call import traced_invoke
from strata.agents.tools.base import Tool, ToolResult
from strata.agents.tools.registry import ToolRegistry, ToolUnavailable
from strata.config import AgentConfig
from strata.cost.run_accounting import RunAccounting
from strata.observability import tracing_genai as genai
from strata.observability.tracing import INVALID_SPAN, Span, Tracing, extract, fail
from strata.store.run_journal import RunBatch
from strata.store.runs import LeaseLost, RunStore, Unit, aware, finish, utcnow
from strata.store.tables import Message, Run

log = structlog.get_logger("strata.engine")


class _Stop(Exception):
    """The run reached a terminal state or paused; nothing more to do now."""


class RunEngine:
    def __init__(
        self,
        store: RunStore,
        catalog: AgentCatalog,
        tools: ToolRegistry,
        caller: ModelCaller,
        bus: EventBus,
        accounting: RunAccounting,
        lease_s: float,
        tracing: Tracing | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.tools = tools
        self.caller = caller
        self.bus = bus
        self.accounting = accounting
        self.lease_s = lease_s
        self.tracing = tracing or caller.tracing  # by default the app's, which the chat service carries

    async def execute(self, run: Run, owner: str) -> Run | None:
        """Drive a claimed run until it ends, pauses for approval, or this worker loses it. Returns the run as this
        execution ended it (completed, failed, cancelled: its counters and end as written), else None."""
        with self.tracing.span(
            f"{genai.INVOKE_AGENT} {run.agent}", attributes=_run_attributes(run), parent=extract(run.trace_parent)
        ) as span:
            log.info("run claimed", attempt=run.attempts)  # inside the span: the line carries the run's trace
            return await self._execute(run, owner, span)

    async def _execute(self, run: Run, owner: str, span: Span) -> Run | None:
        spec = await self.catalog.version(run.agent, run.agent_version)
        if span.is_recording():
            span.set_attribute(genai.REQUEST_MODEL, spec.model)
            provider = self.caller.provider_name(spec.model)
            if provider:
                span.set_attribute(genai.PROVIDER, provider)
        try:
            if spec.entrypoint:
                from strata.agents.code_job import CodeJob  # it builds on _Job, below

                job = CodeJob(self, run, owner, spec, span)
            else:
                job = _Job(self, run, owner, spec, span)
        except ToolUnavailable as exc:
            _record_end(span, await self.end(run, owner, "failed", str(exc)), "failed", str(exc))
            return None
        remaining = (aware(run.deadline_at) - utcnow()).total_seconds()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                await job.drive()
        except _Stop:
            pass
        except TimeoutError:
            await job.end("failed", f"timeout: the run exceeded its {spec.limits.timeout_s:g}s limit")
        except DeadlineExceeded as exc:
            await job.end("failed", f"timeout: {exc}")
        except ModelStepError as exc:
            await job.end("failed", f"model error: {exc}{job.fallback_note}")
        except LeaseLost:
            log.warning("lost the lease of a run; another worker has it", run_id=run.id)
        except Exception as exc:  # a bug or a malformed backend reply: end the run, do not retry it forever
            log.exception("run failed unexpectedly", run_id=run.id)
            with contextlib.suppress(LeaseLost):
                await job.end("failed", f"internal error: {type(exc).__name__}: {exc}")
        # Ended by `job.end`: the batch's commit set the end and the job kept the counters (awaiting approval is
        # set elsewhere, and a lost lease leaves it running: the caller reads those back).
        return job.run if job.ended else None

    async def end(self, run: Run, owner: str, status: str, reason: str | None, output: str | None = None) -> Run:
        """Move a run this worker holds to a terminal state (fenced on the lease); returns it as stored."""
        async with self.store.unit(run_id=run.id, owner=owner, lease_s=self.lease_s) as unit:
            fresh = await unit.tx.get(Run, run.id, populate_existing=True)
            assert fresh is not None
            await finish(unit, fresh, status, reason, output)
        self.accounting.run_finished(fresh)
        return fresh


class _Job:
    """One execution of a run. Its writes go into `batch` and are committed with the next step's start (or
    the run's end), in one transaction: each step is still written before the next one begins."""

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
        self.running_calls = 0  # tool calls of the current turn still executing
        self.ended = False  # the run's end was committed by `end`

    def unit(self) -> Any:
        return self.store.unit(run_id=self.run.id, owner=self.owner, lease_s=self.engine.lease_s)

    async def fresh_run(self, unit: Unit) -> Run:
        run = await unit.tx.get(Run, self.run.id, populate_existing=True)
        assert run is not None
        self.run = run
        return run

    async def commit(self) -> None:
        """Write the batch now (one fenced transaction); raises `LeaseLost` if another worker has the run."""
        batch, self.batch = self.batch, RunBatch()
        await self.store.commit(self.run, self.owner, self.engine.lease_s, batch)

    async def end(self, status: str, reason: str | None, output: str | None = None) -> None:
        self.batch.end(status, reason, output)
        try:
            await self.commit()
        finally:  # ended even if this task was cancelled while the end was written (the commit finishes it)
            if self.run.status == status:
                self.ended = True
                self.engine.accounting.run_finished(self.run)
                _record_end(self.span, self.run, status, reason)

    async def stop(self, status: str, reason: str | None, output: str | None = None) -> None:
        await self.end(status, reason, output)
        raise _Stop

    async def drive(self) -> None:
        # Read once: while this worker holds the lease, only this run writes the session's messages (a session
        # runs one run at a time), so each step appends what it wrote instead of reading them all back.
        self.history = await self.store.messages(self.run.session_id)
        await self._begin()
        while True:
            history = self.history
            mine = [m for m in history if m.run_id == self.run.id]
            last = mine[-1].data
            if last["role"] == "assistant" and not last.get("tool_calls"):
                await self.stop("completed", None, last.get("content") or "")
            pending, turn = _pending_calls(mine)
            if pending:
                await self._tools(pending, turn, mine)
            else:
                await self._model_step(history, len([m for m in mine if m.role == "assistant"]))

    async def _begin(self) -> None:
        run = self.run  # as claimed, so its cancel flag is fresh
        if run.cancel_requested:
            await self.stop("cancelled", "cancelled by request")
        if any(m.run_id == run.id for m in self.history):
            self.batch.add_event("run.resumed", {"attempt": run.attempts})
        else:  # first pick-up: the user's message joins the session now, in order
            self.history.append(self.batch.add_message(run.session_id, run.id, run.input))
            self.batch.add_event("run.started", {"agent": run.agent, "version": run.agent_version})

    # -- model ---------------------------------------------------------------------------------

    async def _model_step(self, history: list[Message], turn: int) -> None:
        limits, run = self.spec.limits, self.run
        reason = limit_reached(self.spec, run)
        if reason:
            await self.stop("failed", reason)
        if self.refused_model is not None:
            await self.stop("failed", f"model not allowed: this run's API key may not use model {self.refused_model!r}")
        step_input = {"messages": len(history) + bool(self.spec.system_prompt), "tools": sorted(self.tools)}
        self.batch.start_step(turn=turn, kind="model", name=self.spec.model, input_=step_input)
        self.batch.add_event("step.started", {"turn": turn, "kind": "model", "model": self.spec.model})
        await self.commit()
        messages = [m.data for m in history]
        if self.spec.system_prompt:
            messages.insert(0, {"role": "system", "content": self.spec.system_prompt})
        rounds = sum(1 for m in history if m.run_id == run.id and m.role == "assistant" and m.data.get("tool_calls"))
        offered = limits.tool_rounds is None or rounds < limits.tool_rounds
        step_started = time.monotonic()
        outcome = await self.engine.caller.call(
            agent=self.spec.name,
            models=self.models,
            allowed=self.allowed,
            messages=messages,
            tools=[tool.spec.openai_schema() for tool in self.tools.values()] if offered else [],
            temperature=self.spec.temperature,
            max_tokens=self.spec.max_tokens_per_step,
            deadline=self.deadline,
            call_id=f"{turn}",
            on_delta=lambda text: self._delta(text, turn),
            on_wait=self._waiting,
            on_fallback=self._fallback,
        )
        latency = time.monotonic() - step_started
        unique_call_ids(outcome.message)
        accounting = self.engine.accounting
        use = outcome.use
        cost = accounting.step_cost(use)
        tokens = {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens}
        counters = {"steps_taken": 1, **tokens, "cost_usd": cost}
        for name, delta in counters.items():  # at once: the next step's limit checks see them
            setattr(run, name, getattr(run, name) + delta)
        batch = self.batch
        batch.count(**counters)
        batch.complete_step(turn=turn, kind="model", output=outcome.message, **tokens)
        self.history.append(batch.add_message(run.session_id, run.id, outcome.message))
        batch.add_event(
            "message.completed",
            {"turn": turn, "model": outcome.model, "message": outcome.message, "usage": tokens, "cost_usd": cost},
        )
        for call in outcome.tool_calls:
            batch.add_event("tool.called", _call_event(call, f"{run.id}:{turn}:{call['id']}"))
        # Usage is settled once the step is durable: a step lost to a crash is made again, and billed once.
        batch.after.append(lambda: accounting.model_step(run, use, latency, cost))

    def _delta(self, text: str, turn: int) -> None:
        self.engine.bus.publish(LiveEvent(self.run.id, "message.delta", {"content": text, "turn": turn}, None))

    async def _waiting(self, reason: str, delay_s: float) -> None:
        async with self.unit() as unit:
            await unit.add_event(self.run.id, "run.waiting", {"reason": reason, "retry_in_s": round(delay_s, 3)})

    async def _fallback(self, failed: str, fallback: str, error: str) -> None:
        async with self.unit() as unit:
            await unit.add_event(self.run.id, "run.fallback", {"from": failed, "to": fallback, "error": error})

    # -- tools ---------------------------------------------------------------------------------

    async def _tools(self, pending: list[dict[str, Any]], turn: int, mine: list[Message]) -> None:
        approvals = self.run.approvals or {}
        waiting = [
            c for c in pending if self._needs_approval(c) and call_binding(self.run.id, turn, c) not in approvals
        ]
        if waiting:
            await self._pause_for_approval(waiting, turn)
        assistants = [m for m in mine if m.role == "assistant"]
        previous = [
            call_signature(c["function"]["name"], c["function"]["arguments"])
            for m in assistants[:-1]  # the last one holds the calls about to run
            for c in m.data.get("tool_calls") or ()
        ]
        upcoming = [call_signature(c["function"]["name"], c["function"]["arguments"]) for c in pending]
        loop = detect_loop(previous, upcoming, self.spec.limits.loop_repeats)
        if loop:
            await self.stop("failed", loop)
        calls = [self._prepare(call, turn) for call in pending]
        await self.commit()  # every call of the turn recorded `started` before any runs
        self.running_calls = len(calls)
        if len(calls) == 1:  # the common case: no task to make and schedule
            await self._tool_call(*calls[0])
        else:
            await asyncio.gather(*(self._tool_call(*call) for call in calls))

    def _needs_approval(self, call: dict[str, Any]) -> bool:
        name = call["function"]["name"]
        tool = self.tools.get(name)
        return name in self.spec.require_approval or bool(tool and tool.spec.requires_approval)

    async def _pause_for_approval(self, calls: list[dict[str, Any]], turn: int) -> None:
        await self._pause_for([pending_entry(self.run.id, turn, c) for c in calls])

    async def _pause_for(self, requested: list[dict[str, Any]]) -> None:
        """Wait for approvers to decide on `requested` (entries as `approvals.pending_entry` makes them)."""
        await self.commit()  # what the run did so far, before it waits
        async with self.unit() as unit:
            run = await self.fresh_run(unit)
            if run.cancel_requested:  # asked while running: never leave it waiting for an approver
                await finish(unit, run, "cancelled", "cancelled by request")
                _record_end(self.span, run, "cancelled", "cancelled by request")
                raise _Stop
            run.status = "awaiting_approval"
            run.pending_approval = requested
            run.lease_owner = None
            run.lease_expires_at = None
            await unit.add_event(run.id, "approval.requested", {"calls": requested})
        _record_end(self.span, run, "awaiting_approval", None)
        raise _Stop

    def _prepare(self, call: dict[str, Any], turn: int) -> tuple[dict[str, Any], int, str, dict[str, Any] | None]:
        """Record the call's step as started (in the batch); returns what `_tool_call` needs."""
        run = self.run
        name, call_id = call["function"]["name"], call["id"]
        key = f"{run.id}:{turn}:{call_id}"
        decision = (run.approvals or {}).get(call_binding(run.id, turn, call))  # this very call's, if any
        arguments_text = call["function"]["arguments"]
        if decision and decision.get("arguments") is not None:
            arguments_text = orjson.dumps(decision["arguments"]).decode()
        self.batch.start_step(
            turn=turn, kind="tool", name=name, call_id=call_id, input_={"arguments": arguments_text},
            idempotency_key=key,
        )  # fmt: skip
        self.batch.add_event("step.started", {"turn": turn, "kind": "tool", "tool": name, "call_id": call_id})
        return call, turn, arguments_text, decision

    async def _tool_call(self, call: dict[str, Any], turn: int, arguments_text: str, decision: Any) -> None:
        run = self.run
        name, call_id = call["function"]["name"], call["id"]
        key = f"{run.id}:{turn}:{call_id}"
        if decision and decision.get("decision") == "deny":
            comment = decision.get("comment")
            result = ToolResult("The call was denied by an approver." + (f" {comment}" if comment else ""), True)
            outcome = "denied"
        else:
            result, outcome = await traced_invoke(
                self.engine.tracing, self.tools, run.id, name, call_id, arguments_text, key
            )
        self.engine.accounting.tool_called(name, outcome)
        batch = self.batch
        batch.complete_step(
            turn=turn, kind="tool", call_id=call_id, status="failed" if result.is_error else "completed",
            output={"content": result.content, "is_error": result.is_error},
            error=result.content if result.is_error else None,
        )  # fmt: skip
        content = f"Error: {result.content}" if result.is_error else result.content
        message = {"role": "tool", "tool_call_id": call_id, "content": content}
        self.history.append(batch.add_message(run.session_id, run.id, message))
        batch.add_event(
            "tool.result", {"call_id": call_id, "tool": name, "content": result.content, "is_error": result.is_error}
        )
        self.running_calls -= 1
        if self.running_calls:  # others of this turn still run: make this result durable now
            await self.commit()
        # else: the last one's result is committed with the next step's start


def _run_attributes(run: Run) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        genai.OPERATION: genai.INVOKE_AGENT,
        genai.AGENT_NAME: run.agent,
        genai.AGENT_VERSION: str(run.agent_version),
        genai.CONVERSATION_ID: run.session_id,
        genai.RUN_ID: run.id,
        genai.RUN_ATTEMPT: run.attempts,
    }
    if run.owner is not None:
        attributes[genai.OWNER] = run.owner
    return attributes


def _record_end(span: Span, run: Run, status: str, reason: str | None) -> None:
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


def _pending_calls(mine: list[Message]) -> tuple[list[dict[str, Any]], int]:
    """Tool calls of the run's last assistant message that have no result yet, and its turn."""
    assistant_indexes = [i for i, m in enumerate(mine) if m.role == "assistant"]
    if not assistant_indexes:
        return [], 0
    last = assistant_indexes[-1]
    calls = mine[last].data.get("tool_calls") or []
    answered = {m.data.get("tool_call_id") for m in mine[last + 1 :] if m.role == "tool"}
    return [c for c in calls if c["id"] not in answered], len(assistant_indexes) - 1


def _call_event(call: dict[str, Any], key: str) -> dict[str, Any]:
    function = call["function"]
    return {"call_id": call["id"], "tool": function["name"], "arguments": function["arguments"], "idempotency_key": key}
