"""The embedded models of the default config through `strata serve`, on the endpoints beside chat: embeddings
(`smollm2-135m-embed`) and legacy text completions (`smollm2-135m`), driven with the openai SDK and langchain-openai."""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from tests.support.strata_process import StrataProcess

pytestmark = pytest.mark.e2e
EMBED = "smollm2-135m-embed"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    """`strata serve` with no models configured: the embedded chat and embedding models."""
    process = StrataProcess(tmp_path_factory.mktemp("embed"), {"server": {"drain_delay_s": 0}}).start(timeout_s=180)
    yield process
    process.stop()


@pytest.fixture
def client(embedded: StrataProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded.base_url, api_key=embedded.api_key, max_retries=0, timeout=120)


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_similar_sentences_are_closer_than_unrelated(client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
    result = client.embeddings.create(model=EMBED, input=texts)  # the SDK asks for base64 and decodes it
    cat, cat_again, markets = (item.embedding for item in result.data)
    assert len(cat) == 576  # SmolLM2-135M's hidden size
    assert _cosine(cat, cat_again) > _cosine(cat, markets)
    assert result.usage.prompt_tokens > 10
    assert result.model == EMBED


def test_float_and_base64_agree(embedded: StrataProcess) -> None:
    with embedded.client(timeout=60) as http:
        plain = http.post("/v1/embeddings", json={"model": EMBED, "input": "hello", "encoding_format": "float"})
    sdk = openai.OpenAI(base_url=embedded.base_url, api_key=embedded.api_key, max_retries=0)
    decoded = sdk.embeddings.create(model=EMBED, input="hello").data[0].embedding
    assert plain.json()["data"][0]["embedding"] == pytest.approx(decoded, abs=1e-6)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": [[1, 2, 3]]}, "input", "not token ids"),
        ({"input": "hi", "dimensions": 64}, "dimensions", "576 dimensions"),
        ({"input": "word " * 5000}, "input[0]", "more than this model's context"),
    ],
)
def test_what_the_embedded_model_cannot_do_is_a_400_naming_it(
    embedded: StrataProcess, body: dict[str, object], param: str, words: str
) -> None:
    with embedded.client(timeout=60) as http:
        response = http.post("/v1/embeddings", json={"model": EMBED, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], words in error["message"]) == (param, True), error


def test_chat_and_embedding_models_refuse_each_others_endpoint(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="serves embeddings, not chat completions") as chat:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert chat.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match=f"not embeddings; models for embeddings: {EMBED}"):
        client.embeddings.create(model="smollm2-135m", input="hi")


def test_models_list_both_with_what_they_serve(embedded: StrataProcess) -> None:
    with embedded.client() as http:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models[EMBED]["kind"] == "embedded" and models[EMBED]["endpoints"] == ["/v1/embeddings"]
    assert models["smollm2-135m"]["endpoints"] == ["/v1/chat/completions", "/v1/completions"]


def test_langchain_embeddings(embedded: StrataProcess) -> None:
    embeddings = OpenAIEmbeddings(
        model=EMBED, base_url=embedded.base_url, api_key=embedded.api_key, check_embedding_ctx_length=False
    )
    documents = embeddings.embed_documents(["How do I bake bread?", "Investors sold shares."])
    query = embeddings.embed_query("a recipe for a loaf of bread")
    assert _cosine(query, documents[0]) > _cosine(query, documents[1])


def test_a_backend_error_leaves_the_server_answering(embedded: StrataProcess) -> None:
    with embedded.client(timeout=60) as http:
        http.post("/v1/embeddings", json={"model": EMBED, "input": [[1]]})
        after = http.post("/v1/embeddings", json={"model": EMBED, "input": "still here"})
    assert after.status_code == 200


def test_text_completion_continues_the_prompt(client: openai.OpenAI) -> None:
    result = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
    assert result.choices[0].text.strip()
    assert 0 < result.usage.completion_tokens <= 6
    assert result.usage.prompt_tokens > 3


def test_text_completion_streams_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="smollm2-135m",
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 8


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"suffix": " the end"}, "suffix"),
        ({"logprobs": 2}, "logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [[1, 2]]}, "prompt"),
    ],
)
def test_what_embedded_completions_cannot_do_is_a_400_naming_it(
    embedded: StrataProcess, extra: dict[str, object], param: str
) -> None:
    with embedded.client(timeout=60) as http:
        response = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_langchain_legacy_llm(embedded: StrataProcess) -> None:
    from langchain_openai import OpenAI

    llm = OpenAI(model="smollm2-135m", base_url=embedded.base_url, api_key=embedded.api_key, max_tokens=8)
    assert llm.invoke("The capital of France is").strip()


def test_legacy_functions_are_a_400_saying_what_to_send(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="send tools instead") as refused:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "What time is it?"}],
            functions=[{"name": "get_time", "parameters": {"type": "object", "properties": {}}}],  # type: ignore[arg-type]
        )
    assert refused.value.body["param"] == "functions"  # type: ignore[index]


def test_allowed_tools_get_a_call_of_an_allowed_tool(client: openai.OpenAI) -> None:
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
        for name in ("get_weather", "get_time")
    ]
    result = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is the weather?"}],
        tools=tools,  # type: ignore[arg-type]
        tool_choice={  # type: ignore[arg-type,misc]
            "type": "allowed_tools",
            "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]},
        },
        max_tokens=48,
        temperature=0,
    )
    calls = result.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ["get_time"]  # type: ignore[union-attr]


COUNTING = ", ".join(str(n) for n in range(1, 41)) + ","  # a small model goes on counting for thousands of tokens


def test_an_abandoned_completion_stops_the_model_for_the_next_request(client: openai.OpenAI) -> None:
    """The model answers one request at a time: a text completion nobody waits for must not hold the next."""
    with pytest.raises(openai.APITimeoutError):  # it would take minutes: thousands of tokens
        client.completions.create(
            model="smollm2-135m", prompt=COUNTING, max_tokens=4000, temperature=0,
            extra_body={"repeat_penalty": 1.0}, timeout=3,
        )  # fmt: skip
    result = client.completions.create(model="smollm2-135m", prompt="1, 2, 3,", max_tokens=4, timeout=45)
    assert result.usage.completion_tokens > 0
