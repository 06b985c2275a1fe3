"""The bench mock's scripted agent model: 4 tool calls with valid, distinct arguments, then an answer; the same
whether streamed or not."""

from __future__ import annotations

import orjson
from bench.mock_upstream import AGENT_TOOL_TURNS, agent_completion, agent_message, agent_stream

from strata.agents.tools.builtins import calculator
from strata.agents.tools.functions import FunctionTool

SCHEMA = FunctionTool(calculator).spec.openai_schema()


def conversation() -> list[dict]:
    """Every request of one run, as an agent loop would send it."""
    messages: list[dict] = [{"role": "user", "content": "go"}]
    requests = []
    while True:
        request = {"model": "bench-model", "messages": list(messages), "tools": [SCHEMA]}
        requests.append(request)
        message, finish = agent_message(request)
        messages.append(message)
        if finish == "stop":
            return requests
        for call in message["tool_calls"]:
            arguments = orjson.loads(call["function"]["arguments"])
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": calculator(**arguments)})


def test_four_distinct_valid_calls_then_an_answer() -> None:
    requests = conversation()
    assert len(requests) == AGENT_TOOL_TURNS + 1 == 5
    calls = [agent_message(r)[0]["tool_calls"][0] for r in requests[:-1]]
    assert {c["function"]["name"] for c in calls} == {"calculator"}
    assert len({c["function"]["arguments"] for c in calls}) == len({c["id"] for c in calls}) == 4


def test_streamed_and_plain_answers_carry_the_same_message() -> None:
    for request in conversation():
        plain = orjson.loads(agent_completion(request))["choices"][0]
        body = agent_stream(request, include_usage=True).split(b"\r\n\r\n", 1)[1]
        events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: {")]
        chunks = [orjson.loads(e) for e in events]
        delta = chunks[0]["choices"][0]["delta"]
        assert delta.get("content") == plain["message"]["content"]
        calls = [{k: v for k, v in c.items() if k != "index"} for c in delta.get("tool_calls") or []]
        assert calls == (plain["message"].get("tool_calls") or [])
        assert chunks[1]["choices"][0]["finish_reason"] == plain["finish_reason"]
        assert chunks[-1]["usage"]["total_tokens"] > 0 and body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


async def test_the_code_agent_variant_runs_the_same_five_model_and_four_tool_steps() -> None:
    from bench.code_agent import tool_loop
    from bench.mock_upstream import CONTENT

    from strata.agents.durable import MemoryJournal, ModelReply, RunContext, ToolOutput

    class Ports:
        async def model(self, request, key):  # type: ignore[no-untyped-def]
            body = {"messages": request.messages, "tools": request.tools}
            return ModelReply(agent_message(body)[0], "bench-model")

        async def tool(self, name, arguments, key):  # type: ignore[no-untyped-def]
            return ToolOutput(calculator(**arguments))

    journal = MemoryJournal()
    ctx = await RunContext.open("run_b", journal, Ports(), input_={"role": "user", "content": "go"}, tools=[SCHEMA])  # type: ignore[arg-type]
    assert await tool_loop(ctx) == CONTENT
    kinds = [entry.kind for entry in await journal.load()]
    assert (kinds.count("model"), kinds.count("tool")) == (AGENT_TOOL_TURNS + 1, AGENT_TOOL_TURNS)
