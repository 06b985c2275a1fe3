"""The run context a durable agent function receives, and the replay rule.

Every primitive (`model`, `tool`, `step`, `approval`, `sleep`, `child`) takes the next position in
the run's journal *when it is called* (not when it is awaited), so calls started together with `ctx.gather`
are numbered in the order the code names them. At each position:

- a completed entry returns its recorded result and nothing runs again (a failed `step` raises again);
- an entry started but not completed (the process died in flight) is done again with the same key: tools
  get it as their idempotency key, children and approval requests are found by it;
- no entry: the primitive runs and is journaled;
- an entry of another kind, name or input: `NonDeterminism`, and the run fails instead of going on with a
  history that is not its own.

Each call is journaled `started` (the journal decides when that is written: see `agents/job.py`) and then
`completed` or `failed`; the completion is written before the call returns.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from strata.agents.durable.clock import Clock, SystemClock
from strata.agents.durable.journal import Entry, Journal, NonDeterminism, fingerprint
from strata.agents.durable.ports import (
    ApprovalDecision,
    ChildResult,
    ModelReply,
    ModelRequest,
    Ports,
    Suspended,
    ToolOutput,
)

T = TypeVar("T")
_Act = Callable[[Entry, str], Awaitable[Any]]


class StepFailed(Exception):
    """A `ctx.step` raised; recorded, so a replay raises it again rather than running the step twice."""

    def __init__(self, name: str, error: str) -> None:
        super().__init__(f"step {name!r} failed: {error}")
        self.name = name
        self.error = error


class RunContext:
    def __init__(
        self,
        run_id: str,
        journal: Journal,
        ports: Ports,
        recorded: list[Entry],
        *,
        input_: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.run_id = run_id
        self.input = input_ or {}  # the message the run was started with
        self.tools = tools or []  # the agent's tools as a model is offered them (OpenAI function schemas)
        self.journal = journal
        self.ports = ports
        self.clock = clock or SystemClock()
        self._recorded = {entry.seq: entry for entry in recorded}
        self._next = 0

    @classmethod
    async def open(
        cls, run_id: str, journal: Journal, ports: Ports, *, input_: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None, clock: Clock | None = None,
    ) -> RunContext:  # fmt: skip
        return cls(run_id, journal, ports, await journal.load(), input_=input_, tools=tools, clock=clock)

    @property
    def replaying(self) -> bool:
        """True while the function is still re-reading its journal (for logs: not for deciding what to call)."""
        return any(seq >= self._next for seq in self._recorded)

    # -- the primitives --------------------------------------------------------------------------

    def model(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        turn: int | None = None,
        shown: dict[str, Any] | None = None,
    ) -> Awaitable[ModelReply]:
        """One model step (the agent's model and its fallback unless `model` names another). `turn` and `shown`
        say where and how the run's steps show it (default: its position, and a digest of its input)."""
        request = ModelRequest(messages, tools or [], model, temperature, max_tokens)

        async def act(entry: Entry, key: str) -> dict[str, Any]:
            return (await self.ports.model(request, key)).record()

        described = {"messages": messages, "tools": request.tools, "model": model}
        return self._call(
            "model", model or "agent", described, act, lambda out: ModelReply(**out), turn=turn,
            data=(lambda: shown) if shown is not None else None,
        )  # fmt: skip

    def tool(
        self,
        name: str,
        arguments: dict[str, Any] | str | None = None,
        *,
        turn: int | None = None,
        call_id: str = "",
        refusal: str | None = None,
    ) -> Awaitable[ToolOutput]:
        """One tool call; a failure comes back as `is_error` (the way a model would see it), not raised.
        `arguments` may be the JSON text a model wrote (a malformed one becomes an error result). With `turn` and
        `call_id` the call is keyed `run:turn:call_id` (a model's tool call); with `refusal` it is recorded as
        refused with that message instead of running (an approver denied it)."""
        arguments = arguments or {}

        async def act(entry: Entry, key: str) -> dict[str, Any]:
            if refusal is not None:
                output = await self.ports.refuse(name, refusal, key)
            else:
                output = await self.ports.tool(name, arguments, key)
            return {"content": output.content, "is_error": output.is_error}

        shown = {"arguments": arguments} if isinstance(arguments, str) else None
        return self._call(
            "tool", name, arguments, act, lambda out: ToolOutput(**out), turn=turn, call_id=call_id,
            data=(lambda: shown) if shown is not None else None,
        )  # fmt: skip

    def step(self, name: str, fn: Callable[..., T | Awaitable[T]], *args: Any, **kwargs: Any) -> Awaitable[T]:
        """Run `fn(*args, **kwargs)` once (an async function on the loop, a plain one in a thread: it may block);
        its result must be JSON-serialisable. Put anything non-deterministic here (a clock read, a random choice,
        an HTTP call): replays see the recorded value."""

        async def act(entry: Entry, key: str) -> Any:
            if inspect.iscoroutinefunction(fn):
                value = await fn(*args, **kwargs)
            else:
                value = await asyncio.to_thread(fn, *args, **kwargs)
                if inspect.isawaitable(value):  # a plain function that returned an awaitable (a lambda, a partial)
                    value = await value
            try:
                orjson.dumps(value)
            except TypeError as exc:
                raise TypeError(f"step {name!r} returned a value that cannot be journaled: {exc}") from None
            return value

        return self._call("step", name, {"step": name}, act, lambda out: out)

    def approval(self, name: str, payload: dict[str, Any] | None = None) -> Awaitable[ApprovalDecision]:
        """Pause until an approver decides on `payload`; returns the decision (approved or not)."""
        payload = payload or {}

        async def act(entry: Entry, key: str) -> dict[str, Any]:
            decision = await self.ports.approval(name, payload, key)
            if decision is None:
                raise Suspended("approval", [{"key": key, "name": name, "payload": payload}])
            return {"approved": decision.approved, "comment": decision.comment, "data": decision.data}

        return self._call("approval", name, payload, act, lambda out: ApprovalDecision(**out))

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Sleep; the wake-up time is journaled, so a run resumed after a crash sleeps only what is left."""

        async def act(entry: Entry, key: str) -> None:
            await self.clock.sleep(entry.data["until"] - self.clock.now())

        return self._call(
            "sleep", "sleep", {"seconds": seconds}, act, lambda out: None,
            data=lambda: {"until": self.clock.now() + seconds},
        )  # fmt: skip

    def child(self, agent: str, input_: str | dict[str, Any]) -> Awaitable[ChildResult]:
        """Start a run of `agent` (once) and wait for it to end; its result (completed or not) comes back."""
        message = {"role": "user", "content": input_} if isinstance(input_, str) else input_

        async def act(entry: Entry, key: str) -> dict[str, Any]:
            result = await self.ports.child(agent, message, key)
            if result is None:
                raise Suspended("child", [{"key": key, "agent": agent}])
            return {"run_id": result.run_id, "status": result.status, "output": result.output}

        return self._call("child", agent, message, act, lambda out: ChildResult(**out))

    async def gather(self, *calls: Awaitable[T]) -> list[T]:
        """Await primitives together (a fan-out). If some wait (`Suspended`) and none failed, the others still
        finish first, and the run waits for all that wait."""
        results = await asyncio.gather(*calls, return_exceptions=True)
        waiting = [r for r in results if isinstance(r, Suspended)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Suspended):
                raise result
        if waiting:
            raise Suspended(waiting[0].reason, [w for s in waiting for w in s.waiting_for])
        return list(results)  # type: ignore[arg-type]

    def check_finished(self) -> None:
        """After the function returned: a journal holding more than it called is non-determinism too."""
        left = sorted(seq for seq in self._recorded if seq >= self._next)
        if left:
            entry = self._recorded[left[0]]
            raise NonDeterminism(
                f"run {self.run_id}: the agent returned after {self._next} durable calls, but its journal holds "
                f"{len(left)} more, starting with {entry.kind} {entry.name!r} at position {entry.seq}"
            )

    # -- the replay rule -------------------------------------------------------------------------

    def _call(
        self,
        kind: str,
        name: str,
        described: Any,
        act: _Act,
        decode: Callable[[Any], T],
        *,
        data: Callable[[], dict[str, Any]] | None = None,
        turn: int | None = None,
        call_id: str = "",
    ) -> Awaitable[T]:
        seq = self._next  # taken now, synchronously: the order of calls, whatever the order of awaits
        self._next += 1
        entry = self._match(seq, kind, name, fingerprint(described))
        if entry is None:
            entry = Entry(seq, kind, name, fingerprint(described), data=data() if data else {}, turn=turn,
                          call_id=call_id)  # fmt: skip
        return self._run(entry, act, decode)

    def next_is_new(self) -> bool:
        """Whether the next primitive call will act (nothing completed is recorded at its position): a guard that
        holds only for new work (a limit) is checked when this is true, never while replaying."""
        entry = self._recorded.get(self._next)
        return entry is None or not entry.done

    def _match(self, seq: int, kind: str, name: str, digest: str) -> Entry | None:
        entry = self._recorded.get(seq)
        if entry is None:
            return None
        recorded = (entry.kind, entry.name, entry.fingerprint if entry.fingerprint is not None else digest)
        if recorded != (kind, name, digest):
            same = entry.kind == kind and entry.name == name
            raise NonDeterminism(
                f"run {self.run_id}: durable call {seq} is {kind} {name!r}"
                + (" with other input" if same else "")
                + f", but the journal recorded {entry.kind} {entry.name!r} there. The agent's code must make the "
                "same calls in the same order on every execution: put non-deterministic work inside ctx.step"
            )
        return entry

    async def _run(self, entry: Entry, act: _Act, decode: Callable[[Any], T]) -> T:
        if entry.status == "completed":
            return decode(entry.output)
        if entry.status == "failed":
            raise StepFailed(entry.name, entry.error or "")
        if entry.seq not in self._recorded:
            await self.journal.start(entry)
        self._recorded[entry.seq] = entry
        try:
            output = await act(entry, f"{self.run_id}:{entry.key}")
        except (Suspended, asyncio.CancelledError):
            raise
        except Exception as exc:
            if entry.kind != "step":
                raise  # a model or tool port failing ends the run; a step's error is the agent's own
            entry.status, entry.error = "failed", f"{type(exc).__name__}: {exc}"
            await self.journal.complete(entry)
            raise StepFailed(entry.name, entry.error) from exc
        entry.status, entry.output = "completed", output
        await self.journal.complete(entry)
        return decode(output)
