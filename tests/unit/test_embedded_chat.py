"""The embedded server's chat handler: plain-text prompts, OpenAI's shapes, forced tools, a departed client.

A stand-in for `llama_cpp.Llama` records the completions asked for and answers with canned text, so these
tests see the prompts, grammars and chunks without loading a model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from threading import Event
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

from strata.serving import embedded_chat

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


class FakeLlama:
    """Answers a choice (stop ':') with `choice`, anything else with `pieces`, streamed or whole."""

    verbose = False
    model_path = "/models/smollm2.gguf"

    def __init__(self, pieces: list[str], choice: str = "message") -> None:
        self.pieces = pieces
        self.choice = choice
        self.calls: list[dict[str, Any]] = []

    def create_completion(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        usage = {"prompt_tokens": 50, "completion_tokens": 3}
        if kwargs["stop"] == [":"]:
            return {"choices": [{"text": self.choice, "finish_reason": "stop"}], "usage": usage}
        if kwargs.get("stream"):
            return self._stream()
        text = "".join(self.pieces)
        return {"choices": [{"text": text, "finish_reason": "stop", "logprobs": None}], "usage": usage}

    def _stream(self) -> Iterator[dict[str, Any]]:
        for index, piece in enumerate(self.pieces):
            last = index == len(self.pieces) - 1
            yield {"choices": [{"text": piece, "finish_reason": "stop" if last else None, "logprobs": None}]}


def chat(llama: FakeLlama, **request: Any) -> Any:
    return embedded_chat.handle(llama=llama, **{"messages": ASK, "model": "smollm2-135m", **request})  # type: ignore[arg-type]


def test_the_prompt_is_plain_text_and_shows_tool_results() -> None:
    result = '{"temp": "20 C & <sunny>"}'
    messages = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "function": {"name": "get_weather",
                                                                                       "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": result},
    ]  # fmt: skip
    prompt = embedded_chat.render_prompt(messages, [WEATHER])
    assert "&#34;" not in prompt and "&amp;" not in prompt  # no HTML escaping
    assert f"<|im_start|>user\nResult of get_weather: {result}<|im_end|>" in prompt
    assert 'functions.get_weather:\n{"city": "Paris"}<|im_end|>' in prompt
    # With no system message of their own, the tools are still described to the model.
    assert prompt.startswith(
        "<|im_start|>system\nYou have access to the following functions:\n\nfunctions.get_weather:"
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_streamed_tool_call_names_its_function_once() -> None:
    llama = FakeLlama(['{"', "city", '": "', "Paris", '"}'])
    tool_choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(chat(llama, tools=[WEATHER], tool_choice=tool_choice, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [call for d in deltas for call in d.get("tool_calls") or ()]
    assert "".join(call.get("function", {}).get("name") or "" for call in calls) == "get_weather"
    assert [call["id"] for call in calls if "id" in call] == [calls[0]["id"]]
    assert json.loads("".join(call["function"].get("arguments") or "" for call in calls)) == {"city": "Paris"}
    assert deltas[0]["role"] == "assistant"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert all("function_call" not in d for d in deltas)
    # The forced tool needed no choice: one completion, from the prompt that starts the call.
    [completion] = llama.calls
    assert completion["prompt"].endswith("<|im_start|>assistant\nfunctions.get_weather:\n")


def test_required_chooses_among_the_tools_only() -> None:
    llama = FakeLlama(["{}"], choice=" get_time")
    answer = chat(llama, tools=[WEATHER, TIME], tool_choice="required")
    choice, arguments = llama.calls
    assert '" none"' not in choice["grammar"]._grammar  # answering with text is not an option
    assert '" get_weather"' in choice["grammar"]._grammar and '" get_time"' in choice["grammar"]._grammar
    assert arguments["prompt"].endswith("functions.get_time:\n")
    message = answer["choices"][0]["message"]
    assert message["content"] is None and "function_call" not in message
    assert message["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert answer["usage"] == {"prompt_tokens": 50, "completion_tokens": 6, "total_tokens": 56}


def test_tools_without_tool_choice_let_the_model_choose() -> None:
    llama = FakeLlama(["It is sunny."], choice=" none")
    answer = chat(llama, tools=[WEATHER])
    assert '" none"' in llama.calls[0]["grammar"]._grammar
    assert llama.calls[1]["prompt"].endswith("message:\n")
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny."}


def test_on_the_users_turn_a_router_step_picks_the_tool_by_its_description() -> None:
    """SmolLM2 continuing its chat prompt called the first-listed tool for "What is 12*7?"; asked which tool
    answers the message, it picks the calculator. The router's prompt is not the request's: not in its usage."""
    calc = {"type": "function", "function": {"name": "calc", "description": "Evaluate arithmetic.",
                                             "parameters": {"type": "object", "properties": {}}}}  # fmt: skip
    llama = FakeLlama(["{}"], choice=" calc")
    answer = chat(llama, messages=[{"role": "user", "content": "What is 12*7?"}], tools=[TIME, calc])
    router, arguments = llama.calls
    assert "- calc: Evaluate arithmetic.\n- none: no tool fits" in router["prompt"]
    assert "- get_time: no description" in router["prompt"]
    assert router["prompt"].endswith("<|im_start|>user\nWhat is 12*7?<|im_end|>\n<|im_start|>assistant\nTool:")
    assert arguments["prompt"].startswith("<|im_start|>system\nYou have access to the following functions:")
    assert arguments["prompt"].endswith("<|im_start|>assistant\nfunctions.calc:\n")
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "calc"
    assert answer["usage"]["prompt_tokens"] == 50  # the chat prompt's, once


def test_after_a_tool_result_the_choice_stays_in_the_chat() -> None:
    messages = [
        *ASK,
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    llama = FakeLlama(["It is sunny."], choice="message:")
    answer = chat(llama, messages=messages, tools=[WEATHER, TIME])
    choice, content = llama.calls
    assert '"functions.get_weather:"' in choice["grammar"]._grammar and '"message:"' in choice["grammar"]._grammar
    assert choice["prompt"].endswith("Result of get_weather: sunny<|im_end|>\n<|im_start|>assistant\n")
    assert content["prompt"].endswith("message:\n")
    assert answer["choices"][0]["message"]["content"] == "It is sunny."


def test_a_streamed_answer_starts_with_the_role_as_openai_does() -> None:
    chunks = list(chat(FakeLlama(["Hel", "lo"]), stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["model"] for c in chunks} == {"smollm2-135m"} and len({c["id"] for c in chunks}) == 1


def test_generation_stops_once_the_client_has_gone() -> None:
    llama = FakeLlama(["a"])
    gone = Event()
    token = embedded_chat.client_gone.set(gone)
    try:
        chat(llama)
    finally:
        embedded_chat.client_gone.reset(token)
    stop = llama.calls[0]["stopping_criteria"]
    assert stop(None, None) is False
    gone.set()
    assert stop(None, None) is True


def test_response_format_json_object_with_a_schema_constrains_the_answer() -> None:
    llama = FakeLlama(['{"a": 1}'])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat(llama, response_format={"type": "json_object", "schema": schema})
    assert '"\\"a\\""' in llama.calls[0]["grammar"]._grammar  # the schema's property is in the grammar
