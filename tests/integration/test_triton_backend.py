"""`kind: triton` through a real `strata serve`: the openai SDK against Strata, Strata against a KServe v2 gRPC
server shaped like a TensorRT-LLM ensemble on Triton (tests/support/kserve_server.py; Triton itself does not
run here). Chat, streaming, the chat template, usage and cost, readiness from Triton's own health, refusals."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.kserve_server import MODEL, KServeServer
from tests.support.strata_process import StrataProcess


@pytest.fixture(scope="module")
def kserve() -> Iterator[KServeServer]:
    with KServeServer() as server:
        yield server


@pytest.fixture(scope="module")
def strata(kserve: KServeServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    config = {
        "models": [
            {
                "kind": "triton",
                "name": "trt-llm",
                "url": kserve.address,
                "triton_model": MODEL,
                "input_usd_per_mtok": 1000.0,
                "output_usd_per_mtok": 2000.0,
                "startup_timeout_s": 30,
            },
        ],
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 2},
    }
    process = StrataProcess(tmp_path_factory.mktemp("triton"), config).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


@pytest.fixture
def client(strata: StrataProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=strata.base_url, api_key=strata.api_key, max_retries=0, timeout=30)


def test_a_chat_completion_goes_through_triton(client: openai.OpenAI, kserve: KServeServer,
                                               strata: StrataProcess) -> None:  # fmt: skip
    answer = client.chat.completions.with_raw_response.create(
        model="trt-llm",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}],
        max_tokens=7,
        temperature=0.2,
    )
    completion = answer.parse()
    assert completion.choices[0].message.content == "Echo: hello there"
    assert completion.model == "trt-llm" and completion.choices[0].finish_reason == "stop"
    seen = kserve.seen[-1]
    assert seen.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    )  # the chat template, applied by Strata
    assert (seen.max_tokens, seen.stream) == (7, False)
    assert seen.extra["temperature"] == pytest.approx(0.2)
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert float(answer.headers["x-strata-cost-usd"]) > 0  # priced like any other model


def test_a_stream_arrives_word_by_word_with_usage(client: openai.OpenAI, kserve: KServeServer) -> None:
    stream = client.chat.completions.create(
        model="trt-llm", messages=[{"role": "user", "content": "one two three"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "Echo: one two three" and len(pieces) == 4
    assert kserve.seen[-1].stream is True
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["stop"]


def test_an_abandoned_stream_stops_triton(strata: StrataProcess, kserve: KServeServer) -> None:
    kserve.chunk_delay_s = 0.2
    try:
        body = {"model": "trt-llm", "stream": True,
                "messages": [{"role": "user", "content": " ".join(["word"] * 60)}]}  # fmt: skip
        with strata.client().stream("POST", "/v1/chat/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if "word" in line:
                    break  # leave after the first words
        deadline = time.monotonic() + 10
        while kserve.streams_open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kserve.streams_open == 0, "Triton kept generating for a client that left"
    finally:
        kserve.chunk_delay_s = 0.0


def test_what_triton_cannot_do_is_refused_clearly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model="trt-llm", messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        )  # fmt: skip
    assert "tools is not supported by models served through Triton" in str(tools.value)
    with pytest.raises(openai.BadRequestError) as many:
        client.chat.completions.create(model="trt-llm", messages=[{"role": "user", "content": "x"}], n=2)
    assert "n:" in str(many.value)


def test_readiness_follows_triton(strata: StrataProcess, kserve: KServeServer) -> None:
    ready = httpx.get(f"{strata.url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert "trt-llm" in ready.text


def test_a_deploy_over_the_api_cannot_name_kind_triton(strata: StrataProcess) -> None:
    refused = strata.client().post("/admin/models/trt-llm/deploy",
                                   json={"kind": "triton", "url": "10.0.0.1:8001"})  # fmt: skip
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "config_only"
