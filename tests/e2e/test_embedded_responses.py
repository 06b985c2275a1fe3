"""The Responses API on the real embedded model (SmolLM2-135M on llama.cpp): the `openai` SDK and the OpenAI
Agents SDK on its default Responses path, with nothing but `strata serve`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from tests.support.strata_process import StrataProcess

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    process = StrataProcess(tmp_path_factory.mktemp("responses"), {"server": {"drain_delay_s": 0}})
    process.start(timeout_s=180)
    yield process
    process.stop()


@pytest.fixture
def client(embedded: StrataProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded.base_url, api_key=embedded.api_key, max_retries=0, timeout=120)


def test_create_stream_and_continue(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        input="What is the capital of France?",
        instructions="Answer in one short sentence.",
        max_output_tokens=24,
        temperature=0,
    )
    assert first.status in ("completed", "incomplete") and first.output_text.strip()
    assert first.usage is not None and 0 < first.usage.output_tokens <= 24
    with client.responses.stream(
        model=MODEL, input="And of Italy?", previous_response_id=first.id, max_output_tokens=16, temperature=0
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert final.output_text.strip() and final.previous_response_id == first.id
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_agents_sdk_default_path(embedded: StrataProcess) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    model = OpenAIResponsesModel(MODEL, openai.AsyncOpenAI(base_url=embedded.base_url, api_key=embedded.api_key))
    agent = Agent(
        name="brief",
        instructions="Answer briefly.",
        model=model,
        model_settings=ModelSettings(max_tokens=256, temperature=0),
    )
    result = asyncio.run(Runner.run(agent, "Reply with one word: what colour is the sky?"))
    assert isinstance(result.final_output, str) and result.final_output.strip()
