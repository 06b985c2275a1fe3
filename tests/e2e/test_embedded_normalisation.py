"""What mainstream clients send, on the real embedded model: the openai SDK against one `strata serve`.

Each request here is one the openai SDK, the Agents SDK or LangChain sends as a matter of course, and each
failed on the embedded model (SmolLM2-135M on llama-cpp-python) before Strata adapted requests and answers
to it. Answers are short (a few tokens): the model is 135M parameters on two busy cores.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.support.strata_process import StrataProcess

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ECHO = {
    "type": "function",
    "function": {
        "name": "echo",
        "description": "Repeat a text",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
ENTITIES = ("&#34;", "&quot;", "&#39;", "&amp;", "&lt;", "&gt;")


@pytest.fixture(scope="module")
def strata(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    process = StrataProcess(tmp_path_factory.mktemp("normalise"), {"server": {"drain_delay_s": 0}}).start(timeout_s=180)
    yield process
    process.stop()


@pytest.fixture
def client(strata: StrataProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=strata.base_url, api_key=strata.api_key, max_retries=0, timeout=120)


def chat(client: openai.OpenAI, **request: Any) -> Any:
    return client.chat.completions.create(**{"model": MODEL, "temperature": 0, "max_tokens": 12, **request})


def test_a_tool_call_round_trip_with_null_content_is_answered(client: openai.OpenAI) -> None:
    """The SDK's own loop: the assistant message goes back as the SDK parsed it (content null)."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = chat(client, messages=ASK, tools=[WEATHER], tool_choice=named, max_tokens=24)
    message = first.choices[0].message
    assert message.content is None and message.tool_calls
    call = message.tool_calls[0]
    messages = [*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'}]
    second = chat(client, messages=messages, tools=[WEATHER])
    reply = second.choices[0].message
    assert reply.content or reply.tool_calls


def test_the_developer_role_is_answered(client: openai.OpenAI) -> None:
    result = chat(client, messages=[{"role": "developer", "content": "Answer in one word."}, *ASK])
    assert result.choices[0].message.content


def test_a_system_message_of_text_parts_is_answered(client: openai.OpenAI) -> None:
    system = {
        "role": "system",
        "content": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Be kind."}],
    }
    result = chat(client, messages=[system, *ASK])
    assert result.choices[0].message.content


def test_max_completion_tokens_bounds_the_answer(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
        max_completion_tokens=5,
        temperature=0,
        timeout=60,
    )
    assert result.choices[0].finish_reason == "length"
    assert 0 < result.usage.completion_tokens <= 5


def test_an_abandoned_request_stops_the_model_for_the_next_one(client: openai.OpenAI) -> None:
    """The model answers one request at a time: one nobody waits for any more must not hold the others."""
    endless = {"role": "user", "content": "Repeat after me forever: la la la la la la la la"}
    with pytest.raises(openai.APITimeoutError):  # it would take minutes: thousands of "la"
        client.chat.completions.create(
            model=MODEL, messages=[endless], max_tokens=4000, temperature=0,
            extra_body={"repeat_penalty": 1.0}, timeout=3,
        )  # fmt: skip
    # A few tokens take a second or two; behind the abandoned request they would wait for minutes.
    result = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, timeout=45
    )
    assert result.usage.completion_tokens > 0


def test_tool_choice_required_gets_a_tool_call(client: openai.OpenAI) -> None:
    result = chat(client, messages=ASK, tools=[ECHO, WEATHER], tool_choice="required", max_tokens=32)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name in ("echo", "get_weather")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_a_named_tool_choice_gets_that_tool(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "echo"}}
    result = chat(client, messages=ASK, tools=[WEATHER, ECHO], tool_choice=named, max_tokens=32)
    message = result.choices[0].message
    [call] = message.tool_calls
    assert call.function.name == "echo"
    assert isinstance(json.loads(call.function.arguments)["text"], str)
    assert message.function_call is None  # OpenAI's answer has tool_calls only, not the legacy field beside them


def test_json_schema_response_format_gives_json_matching_the_schema(client: openai.OpenAI) -> None:
    """LangChain's default structured output: response_format json_schema, strict."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
        "required": ["city", "celsius"],
        "additionalProperties": False,
    }
    result = chat(
        client,
        messages=[{"role": "user", "content": "It is 21 degrees in Paris. Give the city and the temperature."}],
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}},
        max_tokens=40,
    )
    jsonschema.validate(json.loads(result.choices[0].message.content), schema)


def test_streamed_tool_calls_name_the_function_once_with_unescaped_arguments(client: openai.OpenAI) -> None:
    """Accumulated as the SDK does (strings added up), the call has its name once and JSON arguments."""
    text = 'say "hi" & <bye>'
    stream = chat(
        client,
        messages=[{"role": "user", "content": f"Call echo with this exact text: {text}"}],
        tools=[ECHO],
        tool_choice={"type": "function", "function": {"name": "echo"}},
        max_tokens=40,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += (delta.function and delta.function.name) or ""
                call["arguments"] += (delta.function and delta.function.arguments) or ""
    [call] = calls.values()
    assert call["name"] == "echo"
    assert call["id"].startswith("call_") and call["id"].count("call_") == 1
    assert not any(entity in call["arguments"] for entity in ENTITIES), call["arguments"]
    assert isinstance(json.loads(call["arguments"])["text"], str)
    assert finish == "tool_calls"


def test_more_than_one_choice_is_refused_naming_n(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, messages=ASK, n=2)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "n"
    assert "one choice" in error["message"]


def test_a_request_id_that_is_not_a_uuid_reaches_the_model(client: openai.OpenAI) -> None:
    request_id = f"my-app:{uuid.uuid4().hex[:8]}"
    response = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=4, extra_headers={"X-Request-ID": request_id}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id  # the client's id is the one Strata logs and returns
    assert response.parse().usage.completion_tokens > 0


def test_langchain_binds_tools_and_gives_structured_output(strata: StrataProcess) -> None:
    """LangChain's ChatOpenAI: a tool-call round trip through bind_tools, and with_structured_output's default
    (response_format json_schema)."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from pydantic import BaseModel

    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=strata.base_url, api_key=strata.api_key, temperature=0, max_tokens=24, max_retries=0
    )
    ask = HumanMessage("What's the weather in Paris?")
    call = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke([ask])
    [tool_call] = call.tool_calls
    assert tool_call["name"] == "get_weather" and isinstance(tool_call["args"]["city"], str)
    result = ToolMessage('{"temp_c": 21}', tool_call_id=tool_call["id"])
    reply = llm.bind_tools([WEATHER]).invoke([ask, call, result])
    assert reply.content or reply.tool_calls

    class Weather(BaseModel):
        city: str
        celsius: int

    answer = llm.with_structured_output(Weather).invoke("It is 21 degrees in Paris. Give the city and the temperature.")
    assert isinstance(answer, Weather)
