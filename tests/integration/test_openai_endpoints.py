"""`/v1/embeddings` and `GET /v1/models/{id}` through a real `strata serve` in front of the mock backend, driven
with the `openai` SDK and langchain-openai: what a user of either notices (vectors, usage, cost, key limits)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess

PRICED = {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 8.0}


@pytest.fixture(scope="module")
def server(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    workdir: Path = tmp_path_factory.mktemp("endpoints")
    config = {
        "models": [mock_model(mock_backend, **PRICED), mock_model(mock_backend, "mock-hidden-model")],
        "server": {"health_interval_s": 0.5, "drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    process = StrataProcess(workdir, config, env={"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    process.stop()


@pytest.fixture
def client(server: StrataProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_sdk_embeddings_come_back_decoded_with_usage(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    texts = ["the cat sat on the mat", "a cat sat on a mat", "stock markets fell sharply"]
    result = client.embeddings.create(model="mock-model", input=texts)
    vectors = [item.embedding for item in result.data]
    assert [item.index for item in result.data] == [0, 1, 2]
    assert all(len(v) == 64 for v in vectors)
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2])
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (16, 16)  # the mock counts words
    sent = [r for r in mock_backend.requests if r.path == "/v1/embeddings"][-1].body
    assert sent is not None
    assert sent["model"] == "upstream-mock-model"  # the deployment's own name for it
    assert sent["encoding_format"] == "base64"  # what the SDK asks for; the answer went back as the backend sent it


def test_embeddings_are_priced_and_metered(server: StrataProcess, mock_backend: MockBackend) -> None:
    with server.client() as http:
        response = http.post("/v1/embeddings", json={"model": "mock-model", "input": "one two three four"})
        assert response.status_code == 200, response.text
        assert float(response.headers["x-strata-cost-usd"]) == pytest.approx(4 * 2.0 / 1e6)
        rows: list[dict[str, object]] = []
        for _ in range(100):  # usage rows are written in the background
            rows = http.get("/v1/usage", params={"kind": "embeddings", "group_by": "model"}).json()["data"]
            if rows:
                break
            time.sleep(0.1)
    assert rows, "no usage row of kind 'embeddings'"
    assert rows[0]["group"] == "mock-model"
    assert rows[0]["prompt_tokens"] >= 4


def test_missing_usage_is_counted(server: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.embeddings_usage = False
    with server.client() as http:
        body = http.post("/v1/embeddings", json={"model": "mock-model", "input": ["hello world"]}).json()
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/embeddings", {"model": "mock-model", "input": ""}, "input", "an empty string has no embedding"),
        ("/v1/embeddings", {"model": "mock-model", "input": []}, "input", "give at least one input"),
        ("/v1/embeddings", {"model": "mock-model", "input": ["ok", ""]}, "input", "input[1] is an empty string"),
        ("/v1/embeddings", {"model": "mock-model", "input": ["ok", 3]}, "input", "not a mix"),
        ("/v1/embeddings", {"model": "mock-model", "input": [[]]}, "input", "input[0] is an empty list of token ids"),
        ("/v1/embeddings", {"model": "mock-model", "input": {"text": "hi"}}, "input", "a string or a list"),
        ("/v1/embeddings", {"model": "mock-model"}, "input", "required field is missing"),
        ("/v1/embeddings", {"input": "hi"}, "model", "required field is missing"),
        (
            "/v1/embeddings",
            {"model": "mock-model", "input": "hi", "encoding_format": "int8"},
            "encoding_format",
            "'float' or 'base64'",
        ),
        (
            "/v1/embeddings",
            {"model": "mock-model", "input": "hi", "dimensions": 0},
            "dimensions",
            "greater than or equal to 1",
        ),
        ("/v1/completions", {"model": "mock-model"}, "prompt", "required field is missing"),
        ("/v1/completions", {"model": "mock-model", "prompt": []}, "prompt", "non-empty list"),
        ("/v1/completions", {"model": "mock-model", "prompt": ["a", 1]}, "prompt", "not a mix"),
        (
            "/v1/completions",
            {"model": "mock-model", "prompt": "x", "logprobs": 6},
            "logprobs",
            "less than or equal to 5",
        ),
        (
            "/v1/completions",
            {"model": "mock-model", "prompt": "x", "max_tokens": 10**9},
            "max_tokens",
            "more than the limit",
        ),
        (
            "/v1/completions",
            {"model": "mock-model", "prompt": "x", "stream_options": {}},
            "stream_options",
            "only allowed when",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_field(
    server: StrataProcess, mock_backend: MockBackend, path: str, body: dict[str, object], param: str, words: str
) -> None:
    with server.client() as http:
        response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param)
    assert words in error["message"]
    assert not [r for r in mock_backend.requests if r.path == path]  # nothing reached the backend


def test_backend_refusal_reaches_the_client(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.when({"dimensions": 3}, Reply(status=400, error_message="dimensions not supported", error_param="x"))
    with pytest.raises(openai.BadRequestError, match="dimensions not supported"):
        client.embeddings.create(model="mock-model", input="hi", dimensions=3)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="no-such-model", input="hi")


def test_embeddings_tokens_count_against_the_keys_token_limit(server: StrataProcess) -> None:
    key = server.create_key(tpm=5)
    with server.client(key) as http:
        first = http.post("/v1/embeddings", json={"model": "mock-model", "input": "a b c d e f g h"})
        assert first.status_code == 200, first.text
        second = http.post("/v1/embeddings", json={"model": "mock-model", "input": "a"})
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_tokens"


def test_model_allow_list_hides_other_models(server: StrataProcess) -> None:
    key = server.create_key(models=["mock-model"])
    sdk = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
    assert [m.id for m in sdk.models.list()] == ["mock-model"]
    model = sdk.models.retrieve("mock-model")
    assert (model.id, model.object, model.owned_by) == ("mock-model", "model", "strata")
    with server.client(key) as http:
        hidden = http.get("/v1/models/mock-hidden-model")
        unknown = http.get("/v1/models/no-such-model")
        refused = http.post("/v1/embeddings", json={"model": "mock-hidden-model", "input": "hi"})
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"]["message"].replace("mock-hidden-model", "X") == unknown.json()["error"][
        "message"
    ].replace("no-such-model", "X")
    assert hidden.json()["error"]["code"] == "model_not_found"
    assert refused.status_code == 403


def test_admin_sees_every_model_with_its_kind(server: StrataProcess) -> None:
    with server.client() as http:
        listed = http.get("/v1/models").json()["data"]
        one = http.get("/v1/models/mock-model").json()
    assert {m["id"] for m in listed} == {"mock-model", "mock-hidden-model"}
    assert one["kind"] == "openai"
    assert one["endpoints"] == ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


def test_langchain_embeddings(server: StrataProcess) -> None:
    embeddings = OpenAIEmbeddings(
        model="mock-model", base_url=server.base_url, api_key=server.api_key, check_embedding_ctx_length=False
    )
    vectors = embeddings.embed_documents(["the cat sat", "the cat sat down", "markets fell"])
    query = embeddings.embed_query("the cat sat")
    assert len(vectors) == 3 and len(query) == 64
    assert _cosine(query, vectors[1]) > _cosine(query, vectors[2])


def test_token_ids_pass_through(server: StrataProcess, mock_backend: MockBackend) -> None:
    """What langchain-openai sends by default (tiktoken ids): an OpenAI-compatible backend gets them as they are."""
    with server.client() as http:
        response = http.post("/v1/embeddings", json={"model": "mock-model", "input": [[15339, 1070], [9906]]})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2
    sent = [r for r in mock_backend.requests if r.path == "/v1/embeddings"][-1].body
    assert sent is not None and sent["input"] == [[15339, 1070], [9906]]


def test_sdk_text_completion(client: openai.OpenAI, mock_backend: MockBackend, server: StrataProcess) -> None:
    mock_backend.script(Reply(content=" blue.", prompt_tokens=4, completion_tokens=2))
    raw = client.completions.with_raw_response.create(
        model="mock-model", prompt="The sky is", max_tokens=5, stop=["\n"], echo=True
    )
    result = raw.parse()
    assert result.choices[0].text == "The sky is blue."  # echo: the backend's own, passed through
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (4, 2)
    assert float(raw.headers["x-strata-cost-usd"]) == pytest.approx((4 * 2.0 + 2 * 8.0) / 1e6)
    sent = [r for r in mock_backend.requests if r.path == "/v1/completions"][-1].body
    assert sent == {
        "model": "upstream-mock-model",
        "prompt": "The sky is",
        "max_tokens": 5,
        "stop": ["\n"],
        "echo": True,
    }


def test_sdk_text_completion_streams(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="one two three", prompt_tokens=3, completion_tokens=3))
    chunks = list(
        client.completions.create(
            model="mock-model", prompt="count:", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two three"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    mock_backend.script(Reply(content="four five"))
    quiet = list(client.completions.create(model="mock-model", prompt="count:", stream=True))
    assert all(c.usage is None for c in quiet)  # Strata asked for usage to meter it, and kept it to itself
    sent = [r for r in mock_backend.requests if r.path == "/v1/completions"][-1].body
    assert sent is not None and sent["stream_options"] == {"include_usage": True}


def test_text_completion_without_backend_usage_is_counted(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="a fairly long answer here", usage=False))
    result = client.completions.create(model="mock-model", prompt=["first prompt"])
    assert result.usage is not None and result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


def test_langchain_legacy_llm(server: StrataProcess, mock_backend: MockBackend) -> None:
    from langchain_openai import OpenAI

    mock_backend.default = Reply(content="Paris")
    llm = OpenAI(model="mock-model", base_url=server.base_url, api_key=server.api_key, max_retries=0)
    assert llm.invoke("The capital of France is") == "Paris"
    assert "".join(llm.stream("The capital of France is")) == "Paris"


def _tool(name: str) -> dict[str, object]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


def test_allowed_tools_reach_any_backend_as_the_narrowed_tools(
    client: openai.OpenAI, mock_backend: MockBackend
) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec(name="get_time", arguments={})]))
    result = client.chat.completions.create(
        model="mock-model",
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=[_tool("get_weather"), _tool("get_time")],  # type: ignore[list-item]
        tool_choice={  # type: ignore[arg-type,misc]
            "type": "allowed_tools",
            "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]},
        },
    )
    assert result.choices[0].message.tool_calls[0].function.name == "get_time"  # type: ignore[index,union-attr]
    sent = mock_backend.chat_requests()[-1].body
    assert sent is not None
    assert (sent["tools"], sent["tool_choice"]) == ([_tool("get_time")], "required")


def test_custom_tools_are_a_400_naming_the_tool(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    with pytest.raises(openai.BadRequestError, match="'custom' tools") as refused:
        client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "hi"}],
            tools=[_tool("a"), {"type": "custom", "custom": {"name": "sql"}}],  # type: ignore[list-item]
        )
    assert refused.value.body["param"] == "tools[1].type"  # type: ignore[index]
    assert not mock_backend.chat_requests()


def test_legacy_functions_pass_through_to_an_openai_compatible_backend(
    client: openai.OpenAI, mock_backend: MockBackend
) -> None:
    functions = [{"name": "get_time", "parameters": {"type": "object", "properties": {}}}]
    client.chat.completions.create(
        model="mock-model",
        messages=[{"role": "user", "content": "hi"}],
        functions=functions,  # type: ignore[arg-type]
        function_call={"name": "get_time"},
    )
    sent = mock_backend.chat_requests()[-1].body
    assert sent is not None and (sent["functions"], sent["function_call"]) == (functions, {"name": "get_time"})


def test_langchain_chat_model(server: StrataProcess, mock_backend: MockBackend) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class City(BaseModel):
        name: str

    llm = ChatOpenAI(model="mock-model", base_url=server.base_url, api_key=server.api_key, max_retries=0)
    mock_backend.script(
        Reply(content="Hello there."),
        Reply(content="one two three"),
        Reply(tool_calls=[ToolCallSpec(name="get_time", arguments={})]),
        Reply(content='{"name": "Paris"}'),
    )
    assert llm.invoke("hi").content == "Hello there."
    assert "".join(str(chunk.content) for chunk in llm.stream("count")) == "one two three"
    called = llm.bind_tools([_tool("get_time")]).invoke("time?")
    assert [call["name"] for call in called.tool_calls] == ["get_time"]
    assert llm.with_structured_output(City).invoke("Capital of France?") == City(name="Paris")
    structured = mock_backend.chat_requests()[-1].body
    assert structured is not None and structured["response_format"]["type"] == "json_schema"
