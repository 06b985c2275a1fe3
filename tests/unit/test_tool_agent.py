"""The built-in tool-calling agent as a function over the durable run context, with in-memory ports: its calls'
keys, replay after a crash, approvals, denials and the loop guard. No server, no database, no waiting."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from strata.agents.approvals import call_binding
from strata.agents.durable import Entry, MemoryJournal, ModelReply, RunContext, Suspended, ToolOutput
from strata.agents.durable.ports import ModelRequest
from strata.agents.guards import GuardTripped
from strata.agents.tool_agent import ToolAgent
from strata.config import AgentConfig

RUN = "run_1"
SCHEMA = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}


class Crash(BaseException):
    """The process dies here (nothing catches a BaseException, as nothing survives kill -9)."""


def call(call_id: str, expression: str, tool: str = "calc") -> dict[str, Any]:
    arguments = orjson.dumps({"x": expression}).decode()
    return {"id": call_id, "type": "function", "function": {"name": tool, "arguments": arguments}}


class ScriptedPorts:
    """A model that answers from a script, tools that count each key they ran with."""

    def __init__(self, *replies: dict[str, Any]) -> None:
        self.replies = list(replies)
        self.requests: list[ModelRequest] = []
        self.tool_keys: Counter[str] = Counter()
        self.refused: list[str] = []
        self.crash_in_tool: str | None = None

    async def model(self, request: ModelRequest, key: str) -> ModelReply:
        self.requests.append(request)
        return ModelReply(self.replies[len(self.requests) - 1], "mock", 5, 2, 0.001)

    async def tool(self, name: str, arguments: dict[str, Any] | str, key: str) -> ToolOutput:
        if key == self.crash_in_tool:
            raise Crash
        self.tool_keys[key] += 1
        return ToolOutput(f"{name} <- {arguments}")

    async def refuse(self, name: str, message: str, key: str) -> ToolOutput:
        self.refused.append(key)
        return ToolOutput(message, True)


def agent(decisions: dict[str, dict[str, Any]] | None = None, **spec: Any) -> ToolAgent:
    config = AgentConfig(name="a", model="m", system_prompt="Be brief.", tools=["calc"], **spec)
    decisions = decisions or {}
    return ToolAgent(
        config,
        [SCHEMA],
        [{"role": "user", "content": "go"}],
        needs_approval=lambda name: name in config.require_approval,
        decision=lambda turn, c: decisions.get(call_binding(RUN, turn, c)),
    )


async def execute(journal: MemoryJournal, ports: ScriptedPorts, function: ToolAgent) -> str:
    ctx = await RunContext.open(RUN, journal, ports)
    result = await function(ctx)
    ctx.check_finished()
    return result


def assistant(*calls: dict[str, Any], content: str = "") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    return message


async def test_tool_calls_are_keyed_by_turn_and_call_id_and_results_reach_the_model() -> None:
    ports = ScriptedPorts(assistant(call("a", "1"), call("b", "2")), assistant(call("c", "3")), assistant(content="6"))
    journal = MemoryJournal()
    assert await execute(journal, ports, agent()) == "6"
    assert sorted(ports.tool_keys) == [f"{RUN}:0:a", f"{RUN}:0:b", f"{RUN}:1:c"]
    last = ports.requests[-1].messages
    assert last[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in last[1:]] == ["user", "assistant", "tool", "tool", "assistant", "tool"]
    shown = [(e.kind, e.turn, e.call_id) for e in journal.entries.values()]
    assert shown == [("model", 0, ""), ("tool", 0, "a"), ("tool", 0, "b"), ("model", 1, ""), ("tool", 1, "c"),
                     ("model", 2, "")]  # fmt: skip


async def test_a_crash_in_a_tool_call_replays_without_running_completed_calls_again() -> None:
    script = (assistant(call("a", "1")), assistant(call("b", "2"), call("c", "3")), assistant(content="done"))
    ports = ScriptedPorts(*script)
    ports.crash_in_tool = f"{RUN}:1:c"
    journal = MemoryJournal()
    with pytest.raises(Crash):
        await execute(journal, ports, agent())
    again = ScriptedPorts(script[2])  # both model steps before the crash are replayed, never asked again
    assert await execute(journal, again, agent()) == "done"
    assert ports.tool_keys + again.tool_keys == Counter({f"{RUN}:0:a": 1, f"{RUN}:1:b": 1, f"{RUN}:1:c": 1})
    assert len(again.requests) == 1


async def test_a_call_needing_approval_pauses_then_runs_as_edited_or_is_refused() -> None:
    first = call("pay", "1000")
    script = (assistant(first, call("note", "x", tool="calc")), assistant(content="paid"))
    ports = ScriptedPorts(*script)
    journal = MemoryJournal()
    with pytest.raises(Suspended) as paused:
        await execute(journal, ports, agent(require_approval=["calc"]))
    pending = paused.value.waiting_for
    assert [(p["id"], p["turn"]) for p in pending] == [("pay", 0), ("note", 0)]
    assert not ports.tool_keys, "nothing ran before the approver decided"
    decisions = {
        pending[0]["binding"]: {"decision": "approve", "arguments": {"x": "10"}},
        pending[1]["binding"]: {"decision": "deny", "comment": "no"},
    }
    resumed = ScriptedPorts(*script[1:])
    assert await execute(journal, resumed, agent(decisions, require_approval=["calc"])) == "paid"
    assert resumed.tool_keys == Counter({f"{RUN}:0:pay": 1})
    assert resumed.refused == [f"{RUN}:0:note"]
    results = [m["content"] for m in resumed.requests[-1].messages if m["role"] == "tool"]
    assert results == ['calc <- {"x":"10"}', "Error: The call was denied by an approver. no"]


async def test_the_same_call_again_and_again_is_a_loop() -> None:
    ports = ScriptedPorts(*(assistant(call(f"c{i}", "9*9")) for i in range(3)))
    with pytest.raises(GuardTripped, match="loop detected"):
        await execute(MemoryJournal(), ports, agent())
    assert len(ports.tool_keys) == 2


async def test_after_its_tool_rounds_the_model_is_offered_no_tools() -> None:
    ports = ScriptedPorts(assistant(call("a", "1")), assistant(content="ok"))
    assert await execute(MemoryJournal(), ports, agent(limits={"tool_rounds": 1})) == "ok"
    assert [bool(r.tools) for r in ports.requests] == [True, False]


def test_entries_record_where_the_steps_show_them() -> None:
    entry = Entry(4, "tool", "calc", None, turn=1, call_id="c")
    assert (entry.position, entry.key) == (1, "1:c")
    assert Entry(3, "step", "s", "f").key == "3"
