"""Executes a claimed run: its agent function (built-in or code, see `job.py`) under the run's deadline, and
ends the run on whatever stopped it (a model that failed, a timeout, a lost lease, a bug).

Each step is journaled before the next begins, so a run picked up after a crash re-enters its function and
continues from its last completed step: a model call in flight is made again (it has no side effects); a tool
call whose result was committed is never executed again.

Tracing: each execution of a run is an `invoke_agent {agent}` span, a child of the request that created
the run (its `traceparent` is stored with the run, so this holds on any replica and after a resume); its
model calls are `chat {model}` spans and its tool calls `execute_tool {tool}` spans under it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from strata.agents.bus import EventBus
from strata.agents.catalog import AgentCatalog
from strata.agents.job import Job, Stop, record_end
from strata.agents.model_call import DeadlineExceeded, ModelCaller, ModelStepError
from strata.agents.tools.registry import ToolRegistry, ToolUnavailable
from strata.cost.run_accounting import RunAccounting
from strata.observability import tracing_genai as genai
from strata.observability.tracing import Span, Tracing, extract
from strata.store.runs import LeaseLost, RunStore, aware, finish, utcnow
from strata.store.tables import Run

log = structlog.get_logger("strata.engine")


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
        self.wake_workers: Callable[[], None] = lambda: None  # a run was queued again: look for it now (runtime)
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
            job = Job(self, run, owner, spec, span)
        except ToolUnavailable as exc:
            record_end(span, await self.end(run, owner, "failed", str(exc)), "failed", str(exc))
            return None
        remaining = (aware(run.deadline_at) - utcnow()).total_seconds()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                try:
                    await job.drive()
                finally:
                    await job.settle()
        except Stop:
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
        await self.wake_parent(fresh)
        return fresh

    async def wake_parent(self, run: Run) -> None:
        """A run ended: if it is a child its parent waits for, the parent goes on once its last child ended."""
        if run.parent_run_id is None:
            return
        try:
            await self.store.wake_parent(run)
            self.wake_workers()
        except Exception:  # the parent stays waiting; cancelling it ends it
            log.exception("could not wake the parent of a run that ended", run_id=run.id, parent=run.parent_run_id)


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
