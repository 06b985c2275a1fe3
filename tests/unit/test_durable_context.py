"""The durable run context: replay, crash points, non-determinism, pauses. In memory, no waiting."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from strata.agents.durable import (
    ApprovalDecision,
    ChildResult,
    Entry,
    ManualClock,
    MemoryJournal,
    ModelReply,
    NonDeterminism,
    RunContext,
    StepFailed,
    Suspended,
    ToolOutput,
)
from strata.agents.durable.ports import ModelRequest


class Crash(BaseException):
    """The process dies here (a BaseException, as kill -9 would: nothing catches it)."""


class FakePorts:
    """Model, tools, approvals and children in memory; counts every side effect by its key."""

    def __init__(self) -> None:
        self.model_calls = 0
        self.tool_keys: Counter[str] = Counter()
        self.decisions: dict[str, ApprovalDecision] = {}
        self.requested: list[str] = []
        self.children: dict[str, ChildResult | None] = {}
        self.started_children: Counter[str] = Counter()

    async def model(self, request: ModelRequest, key: str) -> ModelReply:
        self.model_calls += 1
        return ModelReply({"role": "assistant", "content": f"answer {len(request.messages)}"}, "mock", 3, 2)

    async def tool(self, name: str, arguments: dict[str, Any], key: str) -> ToolOutput:
        self.tool_keys[key] += 1
        return ToolOutput(f"{name}({arguments})")

    async def approval(self, name: str, payload: dict[str, Any], key: str) -> ApprovalDecision | None:
        self.requested.append(key)
        return self.decisions.get(key)

    async def child(self, agent: str, input_: dict[str, Any], key: str) -> ChildResult | None:
        self.started_children[key] += 1
        return self.children.setdefault(key, None)


class CrashingJournal(MemoryJournal):
    """Dies right after its n-th write (the write itself is durable)."""

    def __init__(self) -> None:
        super().__init__()
        self.crash_after: int | None = None

    async def start(self, entry: Entry) -> None:
        await super().start(entry)
        self._maybe_crash()

    async def complete(self, entry: Entry) -> None:
        await super().complete(entry)
        self._maybe_crash()

    def _maybe_crash(self) -> None:
        if self.crash_after is not None and self.writes >= self.crash_after:
            self.crash_after = None
            raise Crash


async def pipeline(ctx: RunContext, effects: Counter[str]) -> str:
    """A model step, two tool calls, a step of plain code, another model step."""

    def plan(topic: str) -> list[str]:
        effects["plan"] += 1
        return [f"{topic}-a", f"{topic}-b"]

    first = await ctx.model([{"role": "user", "content": "hi"}])
    steps = await ctx.step("plan", plan, first.content)
    for item in steps:
        await ctx.tool("search", {"q": item})
    final = await ctx.model([{"role": "user", "content": "hi"}, first.message])
    return final.content


async def run_once(journal: MemoryJournal, ports: FakePorts, effects: Counter[str], **kw: Any) -> str:
    ctx = await RunContext.open("run_1", journal, ports, **kw)
    result = await pipeline(ctx, effects)
    ctx.check_finished()
    return result


async def test_a_fresh_run_journals_each_call_in_order() -> None:
    journal, ports, effects = MemoryJournal(), FakePorts(), Counter[str]()
    assert await run_once(journal, ports, effects) == "answer 2"
    entries = await journal.load()
    assert [(e.seq, e.kind, e.name, e.status) for e in entries] == [
        (0, "model", "agent", "completed"),
        (1, "step", "plan", "completed"),
        (2, "tool", "search", "completed"),
        (3, "tool", "search", "completed"),
        (4, "model", "agent", "completed"),
    ]
    assert entries[1].output == ["answer 1-a", "answer 1-b"]
    assert sorted(ports.tool_keys) == ["run_1:2", "run_1:3"]


async def test_a_replay_runs_nothing_again() -> None:
    journal, ports, effects = MemoryJournal(), FakePorts(), Counter[str]()
    await run_once(journal, ports, effects)
    writes = journal.writes
    assert await run_once(journal, ports, effects) == "answer 2"
    assert (ports.model_calls, effects["plan"], journal.writes) == (2, 1, writes)
    assert set(ports.tool_keys.values()) == {1}


@pytest.mark.parametrize("crash_after", range(1, 11))
async def test_a_crash_at_each_write_resumes_with_each_completed_call_done_once(crash_after: int) -> None:
    journal, ports, effects = CrashingJournal(), FakePorts(), Counter[str]()
    journal.crash_after = crash_after
    with pytest.raises(Crash):
        await run_once(journal, ports, effects)
    assert await run_once(journal, ports, effects) == "answer 2"
    entries = await journal.load()
    assert [e.status for e in entries] == ["completed"] * 5
    assert (effects["plan"], ports.model_calls) == (1, 2)
    assert ports.tool_keys == {"run_1:2": 1, "run_1:3": 1}


async def test_a_tool_cut_off_after_acting_runs_again_under_the_same_key() -> None:
    journal, ports, effects = MemoryJournal(), FakePorts(), Counter[str]()
    real_tool = ports.tool

    async def dies_after_acting(name: str, arguments: dict[str, Any], key: str) -> ToolOutput:
        await real_tool(name, arguments, key)
        if key == "run_1:3":
            ports.tool = real_tool  # type: ignore[method-assign]
            raise Crash
        return ToolOutput(f"{name}({arguments})")

    ports.tool = dies_after_acting  # type: ignore[method-assign]
    with pytest.raises(Crash):
        await run_once(journal, ports, effects)
    assert await run_once(journal, ports, effects) == "answer 2"
    # The call in flight is made again with its idempotency key, so a tool can refuse to act twice.
    assert ports.tool_keys == {"run_1:2": 1, "run_1:3": 2}


async def test_other_calls_on_replay_fail_with_non_determinism() -> None:
    journal, ports = MemoryJournal(), FakePorts()
    ctx = await RunContext.open("run_1", journal, ports)
    await ctx.tool("search", {"q": "cats"})
    replay = await RunContext.open("run_1", journal, ports)
    with pytest.raises(NonDeterminism, match=r"durable call 0 is tool 'search' with other input.*ctx\.step"):
        await replay.tool("search", {"q": "dogs"})
    replay = await RunContext.open("run_1", journal, ports)
    with pytest.raises(NonDeterminism, match=r"durable call 0 is step 'fetch'.*recorded tool 'search'"):
        await replay.step("fetch", lambda: 1)
    assert sum(ports.tool_keys.values()) == 1


async def test_returning_before_the_journal_is_replayed_is_non_determinism() -> None:
    journal, ports = MemoryJournal(), FakePorts()
    ctx = await RunContext.open("run_1", journal, ports)
    await ctx.tool("a")
    await ctx.tool("b")
    replay = await RunContext.open("run_1", journal, ports)
    await replay.tool("a")
    with pytest.raises(NonDeterminism, match=r"returned after 1 durable calls.*1 more, starting with tool 'b'"):
        replay.check_finished()


async def test_a_failed_step_fails_again_on_replay_without_running() -> None:
    journal, ports, calls = MemoryJournal(), FakePorts(), Counter[str]()

    def flaky() -> None:
        calls["flaky"] += 1
        raise ValueError("upstream said no")

    for _ in range(2):
        ctx = await RunContext.open("run_1", journal, ports)
        with pytest.raises(StepFailed, match="step 'flaky' failed: ValueError: upstream said no"):
            await ctx.step("flaky", flaky)
    assert calls["flaky"] == 1


async def test_a_step_result_that_cannot_be_journaled_is_refused() -> None:
    ctx = await RunContext.open("run_1", MemoryJournal(), FakePorts())
    with pytest.raises(StepFailed, match="step 'obj' returned a value that cannot be journaled"):
        await ctx.step("obj", object)


async def test_an_approval_suspends_the_run_until_decided() -> None:
    journal, ports = MemoryJournal(), FakePorts()

    async def agent(ctx: RunContext) -> str:
        plan = await ctx.step("plan", lambda: ["deploy"])
        decision = await ctx.approval("run plan", {"plan": plan})
        if not decision.approved:
            return f"stopped: {decision.comment}"
        return (await ctx.tool("deploy", {"plan": plan})).content

    with pytest.raises(Suspended) as paused:
        await agent(await RunContext.open("run_1", journal, ports))
    assert paused.value.reason == "approval"
    assert paused.value.waiting_for == [{"key": "run_1:1", "name": "run plan", "payload": {"plan": ["deploy"]}}]
    with pytest.raises(Suspended):  # re-entered before anyone decided: still waiting, nothing ran
        await agent(await RunContext.open("run_1", journal, ports))
    ports.decisions["run_1:1"] = ApprovalDecision(approved=True, comment="ok")
    assert await agent(await RunContext.open("run_1", journal, ports)) == "deploy({'plan': ['deploy']})"
    assert await agent(await RunContext.open("run_1", journal, ports)) == "deploy({'plan': ['deploy']})"
    assert ports.tool_keys == {"run_1:2": 1}


async def test_a_denied_approval_comes_back_as_a_decision() -> None:
    journal, ports = MemoryJournal(), FakePorts()
    ports.decisions["run_1:0"] = ApprovalDecision(approved=False, comment="too risky")
    ctx = await RunContext.open("run_1", journal, ports)
    assert await ctx.approval("x") == ApprovalDecision(approved=False, comment="too risky")


async def test_a_sleep_resumed_after_a_crash_sleeps_only_what_is_left() -> None:
    journal, ports, clock = CrashingJournal(), FakePorts(), ManualClock()
    journal.crash_after = 1  # dies right after the sleep's start (its wake-up time) was written
    with pytest.raises(Crash):
        await (await RunContext.open("run_1", journal, ports, clock=clock)).sleep(60)
    clock.advance(45)  # the process was down this long
    await (await RunContext.open("run_1", journal, ports, clock=clock)).sleep(60)
    assert clock.slept == [15]


async def test_a_fan_out_of_children_waits_for_all_and_starts_each_once() -> None:
    journal, ports = MemoryJournal(), FakePorts()

    async def agent(ctx: RunContext) -> list[str | None]:
        results = await ctx.gather(*(ctx.child("researcher", f"topic {i}") for i in range(3)))
        return [r.output for r in results]

    with pytest.raises(Suspended) as paused:
        await agent(await RunContext.open("run_1", journal, ports))
    assert [w["key"] for w in paused.value.waiting_for] == ["run_1:0", "run_1:1", "run_1:2"]
    ports.children["run_1:0"] = ChildResult("run_c0", "completed", "r0")
    ports.children["run_1:2"] = ChildResult("run_c2", "completed", "r2")
    with pytest.raises(Suspended) as paused:
        await agent(await RunContext.open("run_1", journal, ports))
    assert [w["key"] for w in paused.value.waiting_for] == ["run_1:1"]
    ports.children["run_1:1"] = ChildResult("run_c1", "failed", None)
    assert await agent(await RunContext.open("run_1", journal, ports)) == ["r0", None, "r2"]
    # Each child is asked for by its key on every execution until it ended, then never again.
    assert ports.started_children == {"run_1:0": 2, "run_1:1": 3, "run_1:2": 2}


async def test_calls_are_numbered_when_made_not_when_awaited() -> None:
    journal, ports = MemoryJournal(), FakePorts()
    ctx = await RunContext.open("run_1", journal, ports)
    later, sooner = ctx.tool("a"), ctx.tool("b")
    await sooner
    await later
    assert [(e.seq, e.name) for e in await journal.load()] == [(0, "a"), (1, "b")]
