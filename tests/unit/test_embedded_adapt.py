"""The embedded model's request adaptation: what mainstream clients send, in the form llama-cpp-python takes."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest

from strata.config import AdmissionConfig, BreakerConfig, EmbeddedModelConfig, TimeoutsConfig
from strata.resilience.admission import AdmissionController
from strata.resilience.breaker import CircuitBreaker
from strata.serving.client import OpenAIClient, as_uuid
from strata.serving.deployment import Guards
from strata.serving.embedded import EmbeddedDeployment
from strata.serving.embedded_request import adapt, adapt_completion
from strata.serving.errors import RequestNotSupportedError

CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ROUND_TRIP = [
    {"role": "developer", "content": "Be brief."},
    {"role": "system", "content": [{"type": "text", "text": "You know the weather."}, {"type": "text", "text": "B"}]},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'},
]


def deployment(tmp_path: Path) -> EmbeddedDeployment:
    guards = Guards(AdmissionController.from_config(AdmissionConfig()), CircuitBreaker("x", BreakerConfig()))
    return EmbeddedDeployment(EmbeddedModelConfig(), tmp_path, guards)


def test_the_openai_round_trip_becomes_messages_the_server_accepts() -> None:
    payload = {"model": "m", "messages": copy.deepcopy(ROUND_TRIP)}
    messages = adapt(payload)["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "system", "content": "You know the weather.\nB"}
    assert messages[3] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert messages[2] is payload["messages"][2] and messages[4] is payload["messages"][4]  # untouched
    assert payload["messages"] == ROUND_TRIP  # the caller's payload is not modified


def test_max_completion_tokens_becomes_max_tokens() -> None:
    assert adapt({"messages": [], "max_completion_tokens": 7})["max_tokens"] == 7
    both = adapt({"messages": [], "max_completion_tokens": 7, "max_tokens": 5})
    assert both["max_tokens"] == 5 and "max_completion_tokens" not in both


def test_json_schema_becomes_json_object_with_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    payload = {
        "messages": [],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    assert adapt(payload)["response_format"] == {"type": "json_object", "schema": schema}
    bare = {"messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}
    assert adapt(bare)["response_format"] == {"type": "json_object"}


def test_a_tool_without_parameters_gets_an_empty_object_schema() -> None:
    tools = [{"type": "function", "function": {"name": "now"}}]
    adapted = adapt({"messages": [], "tools": tools})["tools"]
    assert adapted[0]["function"] == {"name": "now", "parameters": {"type": "object", "properties": {}}}
    assert "parameters" not in tools[0]["function"]


@pytest.mark.parametrize("n", [2, 5])
def test_more_than_one_choice_is_refused_naming_n(n: int) -> None:
    with pytest.raises(RequestNotSupportedError) as refused:
        adapt({"messages": [], "n": n}, "smollm2-135m/embedded")
    assert refused.value.param == "n"
    assert refused.value.deployment == "smollm2-135m/embedded"
    assert "n" not in adapt({"messages": [], "n": 1})


@pytest.mark.parametrize(("field", "instead"), [("functions", "tools"), ("function_call", "tool_choice")])
def test_legacy_function_fields_are_refused_naming_them(field: str, instead: str) -> None:
    with pytest.raises(RequestNotSupportedError, match=f"send {instead} instead") as refused:
        adapt({"messages": [{"role": "user", "content": "hi"}], field: [] if field == "functions" else "auto"})
    assert refused.value.param == field


def test_the_embedded_deployment_serves_chat_or_embeddings(tmp_path: Path) -> None:
    assert deployment(tmp_path).serves == {"/chat/completions", "/completions"}
    config = EmbeddedModelConfig(name="e", embedding=True)
    guards = Guards(AdmissionController.from_config(AdmissionConfig()), CircuitBreaker("e", BreakerConfig()))
    embedder = EmbeddedDeployment(config, tmp_path, guards)
    assert embedder.serves == {"/embeddings"}
    assert embedder.launch(1234, "t").argv[2] == "strata.serving.embedding_server"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 2}, "n"), ({"suffix": "x"}, "suffix"), ({"logprobs": 1}, "logprobs"), ({"best_of": 2}, "best_of")],
)
def test_completion_fields_the_server_would_get_wrong_are_refused(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestNotSupportedError) as refused:
        adapt_completion({"prompt": "x", **extra})
    assert refused.value.param == param


def test_a_one_prompt_list_becomes_the_prompt() -> None:
    assert adapt_completion({"prompt": ["hello"], "n": 1, "best_of": 1}) == {"prompt": "hello"}
    for prompt in (["a", "b"], [[1, 2]]):
        with pytest.raises(RequestNotSupportedError) as refused:
            adapt_completion({"prompt": prompt})
        assert refused.value.param == "prompt"


def test_an_image_part_is_refused_naming_it() -> None:
    content: list[dict[str, Any]] = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {}}]
    with pytest.raises(RequestNotSupportedError) as refused:
        adapt({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": content}]})
    assert refused.value.param == "messages[1].content[1]"


def test_the_embedded_deployment_adapts_what_it_sends(tmp_path: Path) -> None:
    payload = {"model": "m", "messages": [{"role": "developer", "content": "x"}], "max_completion_tokens": 3}
    adapted = deployment(tmp_path).adapt(payload)
    assert adapted["messages"] == [{"role": "system", "content": "x"}] and adapted["max_tokens"] == 3


def test_request_ids_reach_the_embedded_server_as_uuids(tmp_path: Path) -> None:
    headers = deployment(tmp_path).client._headers({"X-Request-ID": "abc-123"})
    derived = headers["X-Request-ID"]
    assert str(uuid.UUID(derived)) == derived == as_uuid("abc-123")  # the same id always maps to the same UUID
    given = str(uuid.uuid4())
    assert as_uuid(given) == given
    # Other backends get the client's id as it is.
    remote = OpenAIClient("r", "http://x/v1", api_key=None, timeouts=TimeoutsConfig(), max_connections=1)
    assert remote._headers({"X-Request-ID": "abc-123"})["X-Request-ID"] == "abc-123"
