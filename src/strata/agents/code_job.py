"""One execution of a code agent (`entrypoint:`): its function re-entered over a run context whose journal is
the run's step rows and whose ports are the engine's model dispatcher, tools, approvals and child runs.

A journal entry is a step row (`turn` = the entry's position, `kind` = the primitive, `input` = its
fingerprint and start data, `output` = its result), written in the same fenced batches as the built-in
agent's steps, so the runs API (steps, events, approvals, cancel) sees a code agent's run the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import orjson

from strata.agents.approvals import binding, unique_call_ids
from strata.agents.bus import LiveEvent
from strata.agents.durable.context import RunContext, StepFailed
from strata.agents.durable.entrypoint import EntrypointError, load_entrypoint
from strata.agents.durable.journal import Entry, NonDeterminism
from strata.agents.durable.ports import ApprovalDecision, ChildResult, ModelReply, ModelRequest, Suspended, ToolOutput
from strata.agents.engine import _Job, _Stop
from strata.agents.guards import limit_reached
from strata.agents.model_call import DeadlineExceeded, ModelStepError
from strata.agents.tool_call import traced_invoke
from strata.store.run_journal import JournalClosed, LeaseLost
from strata.store.runs import TERMINAL

if TYPE_CHECKING:
    from strata.agents.catalog import AgentCatalog

# Raised through the agent's function by the engine's own ports: ended by `RunEngine` as for any agent.
ENGINE_ERRORS = (ModelStepError, DeadlineExceeded, LeaseLost, JournalClosed)
CHILD_POLL_S = 1.0  # how often a parent re-reads a child run it waits for (a child on another replica)


class CodeJob(_Job):
    """Drives a code agent's function; ends, pauses or fails the run as the function's outcome says."""

    async def drive(self) -> None:
        try:
            function = load_entrypoint(self.spec.entrypoint or "")
        except EntrypointError as exc:
            await self.stop("failed", str(exc))
        self.history = await self.store.messages(self.run.session_id)
        await self._begin()
        journal = _StepJournal(self)
        tools = [tool.spec.openai_schema() for tool in self.tools.values()]
        ctx = RunContext(
            self.run.id, journal, _EnginePorts(self), await journal.load(), input_=self.run.input, tools=tools
        )
        try:
            result = await function(ctx)
            ctx.check_finished()
        except Suspended as waiting:
            await self._pause(waiting)
        except NonDeterminism as exc:
            await self.stop("failed", f"non-determinism: {exc}")
        except _LimitReached as exc:
            await self.stop("failed", str(exc))
        except StepFailed as exc:
            await self.stop("failed", f"agent error: {exc}")
        except (_Stop, *ENGINE_ERRORS):
            raise  # the engine's own (a model step that failed, a lost lease): `RunEngine` ends the run
        except Exception as exc:  # the agent's code raised: the run fails with what it raised
            await self.stop("failed", f"agent error: {type(exc).__name__}: {exc}")
        output = result if isinstance(result, str) else "" if result is None else orjson.dumps(result).decode()
        self.history.append(
            self.batch.add_message(self.run.session_id, self.run.id, {"role": "assistant", "content": output})
        )
        await self.stop("completed", None, output)

    async def _pause(self, waiting: Suspended) -> None:
        if waiting.reason != "approval":  # children are awaited in place (`_EnginePorts.child`): never here
            await self.stop("failed", f"internal error: the run cannot wait for {waiting.reason}")
        requested = [
            {
                "id": w["key"], "name": w["name"], "arguments": orjson.dumps(w["payload"]).decode(),
                "turn": _position(w["key"]), "binding": _binding(self.run.id, w["key"], w["name"], w["payload"]),
            }
            for w in waiting.waiting_for
        ]  # fmt: skip
        await self._pause_for(requested)


class _LimitReached(Exception):
    pass


def _position(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


def _binding(run_id: str, key: str, name: str, payload: dict[str, Any]) -> str:
    return binding(run_id, _position(key), key, name, orjson.dumps(payload, option=orjson.OPT_SORT_KEYS).decode())


class _StepJournal:
    """Journal entries as the run's step rows, in the job's fenced batches: one transaction per call, written when
    the call completed (a tool's, a step's start rides along), except a model call's and a sleep's start, which are
    written before they begin (followers stream a model step's text once its start is stored; a sleep's wake-up
    time must be durable before it sleeps)."""

    def __init__(self, job: CodeJob) -> None:
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
        self.job.batch.start_step(
            turn=entry.seq, kind=entry.kind, name=entry.name,
            input_={"fingerprint": entry.fingerprint, "data": entry.data},
            idempotency_key=f"{self.job.run.id}:{entry.seq}" if entry.kind == "tool" else None,
        )  # fmt: skip
        started = {"turn": entry.seq, "kind": entry.kind, "name": entry.name}
        if entry.kind in ("model", "tool"):  # as the built-in agent's events name them
            started[entry.kind] = entry.name
        self.job.batch.add_event("step.started", started)
        if entry.kind in ("model", "sleep"):
            await self.job.commit()

    async def complete(self, entry: Entry) -> None:
        batch = self.job.batch
        usage = {}
        if entry.kind == "model":
            usage = {
                "prompt_tokens": entry.output["prompt_tokens"],
                "completion_tokens": entry.output["completion_tokens"],
            }
        batch.complete_step(
            turn=entry.seq, kind=entry.kind, status=entry.status, output={"value": entry.output}, error=entry.error,
            **usage,
        )  # fmt: skip
        if entry.kind == "model":
            output = entry.output
            completed = {"turn": entry.seq, "model": output["model"], "message": output["message"], "usage": usage}
            batch.add_event("message.completed", {**completed, "cost_usd": output["cost_usd"]})
        elif entry.kind == "tool":
            batch.add_event("tool.result", {"call_id": f"{self.job.run.id}:{entry.seq}", "tool": entry.name,
                                            **entry.output})  # fmt: skip
        else:
            batch.add_event("step.completed", {"turn": entry.seq, "kind": entry.kind, "name": entry.name,
                                               "status": entry.status})  # fmt: skip
        await self.job.commit()


class _EnginePorts:
    """What a code agent's context calls: the engine's model dispatcher, tools, approvals and runs."""

    def __init__(self, job: CodeJob) -> None:
        self.job = job

    async def model(self, request: ModelRequest, key: str) -> ModelReply:
        job, run = self.job, self.job.run
        reason = limit_reached(job.spec, run)
        if reason:
            raise _LimitReached(reason)
        models = job.models
        if request.model is not None:
            if job.allowed is not None and request.model not in job.allowed:
                raise _LimitReached(f"model not allowed: this run's API key may not use model {request.model!r}")
            models = [request.model]
        elif job.refused_model is not None:
            raise _LimitReached(f"model not allowed: this run's API key may not use model {job.refused_model!r}")
        turn = _position(key)
        started = time.monotonic()
        outcome = await job.engine.caller.call(
            agent=job.spec.name, models=models, allowed=job.allowed, messages=request.messages, tools=request.tools,
            temperature=request.temperature if request.temperature is not None else job.spec.temperature,
            max_tokens=request.max_tokens or job.spec.max_tokens_per_step, deadline=job.deadline,
            call_id=str(turn), on_delta=lambda text: job._delta(text, turn), on_wait=job._waiting,
            on_fallback=job._fallback,
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
        job.batch.after.append(lambda: accounting.model_step(run, use, latency, cost))
        return ModelReply(outcome.message, outcome.model, outcome.prompt_tokens, outcome.completion_tokens, cost)

    async def tool(self, name: str, arguments: dict[str, Any], key: str) -> ToolOutput:
        job = self.job
        text = orjson.dumps(arguments).decode()
        result, outcome = await traced_invoke(job.engine.tracing, job.tools, job.run.id, name, key, text, key)
        job.engine.accounting.tool_called(name, outcome)
        return ToolOutput(result.content, result.is_error)

    async def approval(self, name: str, payload: dict[str, Any], key: str) -> ApprovalDecision | None:
        decision = (self.job.run.approvals or {}).get(_binding(self.job.run.id, key, name, payload))
        if decision is None:
            return None
        return ApprovalDecision(
            decision.get("decision") == "approve", decision.get("comment"), decision.get("arguments")
        )

    async def child(self, agent: str, input_: dict[str, Any], key: str) -> ChildResult | None:
        job = self.job
        child = await _start_child(job, job.engine.catalog, agent, input_, f"child\x1f{key}")
        while child.status not in TERMINAL:
            with job.engine.bus.subscribe(child.id) as queue, contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_final(queue), CHILD_POLL_S)
            fresh = await job.store.get_run(child.id)
            assert fresh is not None
            child = fresh
        return ChildResult(child.id, child.status, child.output)


async def _final(queue: asyncio.Queue[LiveEvent]) -> None:
    while (await queue.get()).type not in ("run.completed", "run.failed", "run.cancelled"):
        pass


async def _start_child(job: CodeJob, catalog: AgentCatalog, agent: str, message: dict[str, Any], key: str) -> Any:
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
        allowed_models=run.allowed_models, new_session=session,
        model=spec.model,
    )  # fmt: skip
    return child
