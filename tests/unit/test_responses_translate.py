"""The Responses <-> chat-completions mapping, without a server."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from strata.api.errors import ApiError
from strata.api.responses_translate import (
    ResponseStream,
    assistant_message,
    chat_payload,
    from_completion,
    parse_request,
    response_object,
)
from strata.serving.usage import Usage


def request(**fields: Any) -> Any:
    return parse_request({"model": "m", "input": "hi", **fields})


def test_items_become_chat_messages_with_parallel_calls_in_one_assistant_turn() -> None:
    body = request(
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Paris and Rome?"}]},
            {"type": "function_call", "call_id": "a", "name": "w", "arguments": '{"c":"Paris"}'},
            {"type": "function_call", "call_id": "b", "name": "w", "arguments": '{"c":"Rome"}'},
            {"type": "function_call_output", "call_id": "a", "output": "sunny"},
            {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "rain"}]},
        ],
    )
    messages = chat_payload(body, [{"role": "user", "content": "earlier"}])["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "developer", "user", "assistant", "tool", "tool"]
    assert messages[2]["content"] == "Use tools." and messages[3]["content"] == "Paris and Rome?"
    assert [c["id"] for c in messages[4]["tool_calls"]] == ["a", "b"]
    assert messages[6] == {"role": "tool", "tool_call_id": "b", "content": "rain"}


def test_settings_map_to_their_chat_names() -> None:
    tool = {"type": "function", "name": "w", "parameters": {"type": "object"}, "strict": True}
    schema = {"type": "json_schema", "name": "out", "schema": {"type": "object"}}
    payload = chat_payload(
        request(
            tools=[tool],
            tool_choice={"type": "function", "name": "w"},
            max_output_tokens=9,
            temperature=0.2,
            text={"format": schema},
            parallel_tool_calls=False,
            stream=True,
        ),
        [],
    )
    assert payload["tools"] == [
        {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert payload["tool_choice"] == {"type": "function", "function": {"name": "w"}}
    assert (payload["max_tokens"], payload["temperature"], payload["parallel_tool_calls"]) == (9, 0.2, False)
    assert payload["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}},
    }
    assert payload["stream"] is True


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "file_search"}]}, "tools[0].type"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"prompt": {"id": "p"}}, "prompt"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        ({"background": True, "stream": True}, "background"),
        ({"input": ["not an item"]}, "input"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "w"}]}, "input[0].arguments"),
    ],
)
def test_what_strata_cannot_do_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        chat_payload(request(**fields), [])
    assert refused.value.status == 400 and refused.value.param == param


def test_a_chat_answer_becomes_output_items_and_goes_back_as_one_assistant_message() -> None:
    message = {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}],
    }
    output, reason = from_completion({"choices": [{"message": message, "finish_reason": "tool_calls"}]})
    assert [item["type"] for item in output] == ["message", "function_call"]
    assert reason == "tool_calls"
    assert assistant_message(output) == message


def _events(stream: ResponseStream, *chunks: dict[str, Any], usage: Usage | None = None) -> list[dict[str, Any]]:
    raw = stream.start()
    for chunk in chunks:
        raw += stream.feed(chunk)
    raw += stream.finish(usage)
    return [orjson.loads(event.split(b"data: ", 1)[1]) for event in raw]


def _delta(finish: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_a_streamed_tool_call_keeps_its_first_name_and_collects_its_arguments() -> None:
    snapshot = response_object(request(), response_id="resp_1", created_at=0, status="in_progress")
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    again = {"index": 0, "function": {"name": "get_weather", "arguments": '{"city":'}}  # a backend repeating the name
    events = _events(
        ResponseStream(snapshot),
        _delta(tool_calls=[call]),
        _delta(tool_calls=[again]),
        _delta(tool_calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}]),
        _delta("tool_calls"),
        usage=Usage(3, 4),
    )
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1]["response"]
    assert final["output"][0]["name"] == "get_weather" and final["output"][0]["arguments"] == '{"city":"Oslo"}'
    assert final["usage"]["total_tokens"] == 7
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_stream_cut_by_the_length_limit_ends_incomplete() -> None:
    snapshot = response_object(request(), response_id="resp_1", created_at=0, status="in_progress")
    events = _events(ResponseStream(snapshot), _delta(content="Once upon"), _delta("length"))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Once upon"
