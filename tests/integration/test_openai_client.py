"""The official `openai` client against a real `strata serve` in front of the mock backend."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def client(strata: StrataProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=strata.base_url, api_key=strata.api_key, max_retries=0)


@pytest.fixture
def async_client(strata: StrataProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=strata.base_url, api_key=strata.api_key, max_retries=0)


def test_completion_returns_backend_answer_with_usage(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="The sky is blue.", prompt_tokens=7, completion_tokens=5))
    result = client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "What colour is the sky?"}]
    )
    assert result.choices[0].message.content == "The sky is blue."
    assert result.choices[0].finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (7, 5, 12)


def test_parameters_reach_the_backend_untouched(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    client.chat.completions.create(
        model="mock-model",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        response_format={"type": "json_object"},
        stop=["\n\n", "END"],
        max_tokens=42,
        temperature=0.3,
        extra_body={"top_k": 5, "grammar": 'root ::= "x"'},
    )
    sent = mock_backend.chat_requests()[-1]
    body = sent.body
    assert body is not None
    assert body["model"] == "upstream-mock-model"  # the configured upstream name, not the public one
    assert body["tools"] == [WEATHER_TOOL]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["response_format"] == {"type": "json_object"}
    assert body["stop"] == ["\n\n", "END"]
    assert (body["max_tokens"], body["temperature"]) == (42, 0.3)
    assert (body["top_k"], body["grammar"]) == (5, 'root ::= "x"')  # backend-specific extras pass through
    assert sent.headers["Authorization"] == "Bearer mock-secret"  # the key from api_key_env


def test_tool_calls_come_back_parsed(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Paris"}, id="call_1")]))
    result = client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL]
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_1",
        "get_weather",
        {"city": "Paris"},
    )


def test_stream_delivers_every_chunk_and_no_usage_unless_asked(
    client: openai.OpenAI, mock_backend: MockBackend
) -> None:
    mock_backend.script(Reply(content="one two three four"))
    chunks = list(
        client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "count"}], stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    # Strata asked the backend for usage anyway (it meters every request).
    assert mock_backend.chat_requests()[-1].body["stream_options"] == {"include_usage": True}


def test_stream_with_include_usage_ends_with_usage(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="a b c", prompt_tokens=9, completion_tokens=3))
    chunks = list(
        client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (9, 3)


def test_usage_is_filled_when_the_backend_reports_none(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="twelve bytes", usage=False), Reply(content="also some text", usage=False))
    plain = client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hello"}])
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > 0
    streamed = list(
        client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = streamed[-1].usage
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_tool_call_assembles(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"})], chunks=4))
    arguments = ""
    names = []
    for chunk in client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "w"}], tools=[WEATHER_TOOL], stream=True
    ):
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            names += [call.function.name] if call.function.name else []
            arguments += call.function.arguments or ""
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Oslo"}


async def test_async_client_plain_and_streaming(async_client: openai.AsyncOpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="async hello"), Reply(content="async stream", chunks=3))
    plain = await async_client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
    assert plain.choices[0].message.content == "async hello"
    stream = await async_client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "async stream"


def test_sse_wire_format_is_openais(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="x y", chunk_delay_s=0.01))
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", strata.base_url + "/chat/completions", json=body, headers=strata.headers, timeout=10
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for event in events[:-2]:
        assert event.startswith(b"data: {")
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"


def test_models_lists_every_configured_model(client: openai.OpenAI) -> None:
    ids = sorted(model.id for model in client.models.list())
    assert ids == ["mock-fast-timeout", "mock-model", "nowhere"]


def test_request_id_is_returned_and_forwarded(strata: StrataProcess, mock_backend: MockBackend) -> None:
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(
        strata.base_url + "/chat/completions", json=body, headers={**strata.headers, "X-Request-ID": "req-abc.123"}
    )
    assert response.headers["x-request-id"] == "req-abc.123"
    assert mock_backend.chat_requests()[-1].headers["X-Request-ID"] == "req-abc.123"
    generated = httpx.get(strata.url + "/healthz").headers["x-request-id"]
    assert len(generated) == 32
