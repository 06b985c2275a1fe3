"""The Responses API (`/v1/responses`) driven by the real `openai` SDK and the OpenAI Agents SDK on its default
Responses path, against a real `strata serve` in front of the mock backend."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    workdir = tmp_path_factory.mktemp("responses")
    config = {
        "models": [mock_model(mock_backend), mock_model(mock_backend, "mock-other")],
        "tools": {"functions": [{"name": "record", "import_path": "tests.support.agent_tools:record_call"}]},
        "agents": [
            {"name": "helper", "model": "mock-model", "system_prompt": "You help.", "tools": ["calculator"]},
            {
                "name": "approver",
                "model": "mock-model",
                "system_prompt": "You record.",
                "tools": ["record"],
                "require_approval": ["record"],
            },
        ],
        "runs": {"lease_s": 2, "poll_s": 0.1},
        "server": {"health_interval_s": 0.5, "drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    env = {"MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(workdir / "calls.log")}
    process = StrataProcess(workdir, config, env=env).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def client(strata: StrataProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=strata.base_url, api_key=strata.api_key, max_retries=0)


def sent_messages(mock: MockBackend) -> list[dict[str, Any]]:
    body = mock.chat_requests()[-1].body
    assert body is not None
    return body["messages"]


def test_create_answers_with_text_usage_and_instructions(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="The sky is blue.", prompt_tokens=7, completion_tokens=5))
    response = client.responses.create(model="mock-model", input="What colour is the sky?", instructions="Be brief.")
    assert (response.status, response.output_text) == ("completed", "The sky is blue.")
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (7, 5, 12)
    assert sent_messages(mock_backend) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the sky?"},
    ]


def test_stream_sends_typed_events_in_order(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="one two three"))
    with client.responses.stream(model="mock-model", input="Count") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "one two three"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "one two three"
    assert final.usage is not None and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == "one two three"  # stored once the stream ended


def test_function_call_and_its_output_continue_the_conversation(
    client: openai.OpenAI, mock_backend: MockBackend
) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Paris"}, id="call_7")]))
    first = client.responses.create(model="mock-model", input="Weather in Paris?", tools=[WEATHER])
    call = first.output[0]
    assert call.type == "function_call"
    assert (call.call_id, call.name, json.loads(call.arguments)) == ("call_7", "get_weather", {"city": "Paris"})
    assert mock_backend.chat_requests()[-1].body["tools"][0]["function"]["name"] == "get_weather"  # type: ignore[index]
    mock_backend.script(Reply(content="Sunny in Paris."))
    second = client.responses.create(
        model="mock-model",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": "call_7", "output": '{"sky": "sunny"}'}],
        tools=[WEATHER],
    )
    assert second.output_text == "Sunny in Paris."
    assert second.previous_response_id == first.id
    messages = sent_messages(mock_backend)
    assert messages[0] == {"role": "user", "content": "Weather in Paris?"}
    assert messages[1]["tool_calls"][0]["id"] == "call_7"
    assert messages[2] == {"role": "tool", "tool_call_id": "call_7", "content": '{"sky": "sunny"}'}


def test_streamed_function_call_arrives_as_argument_deltas(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"}, id="call_9")]))
    with client.responses.stream(model="mock-model", input="Weather in Oslo?", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Oslo"}
    call = final.output[0]
    assert call.type == "function_call"
    assert (call.call_id, call.name, json.loads(call.arguments)) == ("call_9", "get_weather", {"city": "Oslo"})


def test_stored_responses_are_their_owners_only(strata: StrataProcess, client: openai.OpenAI) -> None:
    created = client.responses.create(model="mock-model", input="remember me")
    assert client.responses.retrieve(created.id).output_text == created.output_text
    other = openai.OpenAI(base_url=strata.base_url, api_key=strata.create_key("user"), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError) as refused:
        other.responses.create(model="mock-model", input="continue", previous_response_id=created.id)
    assert "previous_response_id" in str(refused.value)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(created.id)
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model="mock-model", input="forget me", store=False)
    assert response.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_stored_content_is_encrypted_at_rest(strata: StrataProcess, client: openai.OpenAI) -> None:
    secret = "the launch code is 7351"
    response = client.responses.create(model="mock-model", input=secret, store=True)
    databases = list(Path(strata.workdir).rglob("*.db"))
    assert databases
    with sqlite3.connect(databases[0]) as db:
        body, conversation = db.execute(
            "SELECT body, conversation FROM responses WHERE id = ?", (response.id,)
        ).fetchone()
    assert "$enc" in body and "$enc" in conversation
    assert "7351" not in body + conversation


def test_background_response_completes_later(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="done in the background", latency_s=0.5))
    queued = client.responses.create(model="mock-model", input="take your time", background=True)
    assert queued.status in ("queued", "in_progress")
    for _ in range(100):
        current = client.responses.retrieve(queued.id)
        if current.status not in ("queued", "in_progress"):
            break
        time.sleep(0.1)
    assert (current.status, current.output_text) == ("completed", "done in the background")


def test_a_stream_cut_short_by_the_backend_ends_failed(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="one two three four five six", reset="mid_stream"))
    events = list(client.responses.create(model="mock-model", input="Count", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.message
    assert client.responses.retrieve(failed.id).status == "failed"  # stored as it ended


def test_a_key_limited_to_other_models_is_refused(strata: StrataProcess, mock_backend: MockBackend) -> None:
    narrow = openai.OpenAI(
        base_url=strata.base_url, api_key=strata.create_key("user", models=["mock-other"]), max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError):
        narrow.responses.create(model="mock-model", input="hi")
    with pytest.raises(openai.PermissionDeniedError):  # the agent's model is mock-model too
        narrow.responses.create(model="agent:helper", input="hi")
    assert narrow.responses.create(model="mock-other", input="hi").output_text
    assert mock_backend.chat_requests()[-1].body["model"] == "upstream-mock-other"  # type: ignore[index]


def test_a_background_response_cut_by_a_restart_says_so(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(hang=True))
    client = openai.OpenAI(base_url=strata.base_url, api_key=strata.api_key, max_retries=0)
    queued = client.responses.create(model="mock-model", input="never answered", background=True)
    strata.stop()
    strata.start()  # the module's server again, on the same data
    interrupted = client.responses.retrieve(queued.id)
    assert interrupted.status == "failed"
    assert interrupted.error is not None and interrupted.error.code == "interrupted"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"tools": [{**WEATHER, "name": "get weather"}]}, "tools[0].name"),
        ({"input": "a\u0000b"}, "input"),
        ({"input": [{"type": "message", "content": "no role"}]}, "input[0].role"),
    ],
)
def test_unsupported_fields_are_refused_by_name(strata: StrataProcess, fields: dict[str, Any], param: str) -> None:
    body = {"model": "mock-model", "input": "hi", **fields}
    with strata.client() as http:
        response = http.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_background_for_an_unknown_model_is_refused_at_once(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.responses.create(model="no-such-model", input="hi", background=True)


def test_agent_model_runs_the_agent_durably(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(
        Reply(tool_calls=[ToolCallSpec("calculator", {"expression": "6*7"}, id="c1")]), Reply(content="It is 42.")
    )
    response = client.responses.create(model="agent:helper", input="What is 6*7?")
    assert (response.status, response.output_text) == ("completed", "It is 42.")
    run_id = response.metadata["strata_run_id"]
    with httpx.Client(base_url=str(client.base_url).removesuffix("/v1/"), headers=_auth(client)) as http:
        run = http.get(f"/v1/runs/{run_id}").json()
    assert run["status"] == "completed" and [s["kind"] for s in run["steps"]].count("tool") == 1
    assert response.usage is not None and response.usage.total_tokens == run["usage"]["total_tokens"]


def test_agent_follow_up_continues_the_runs_session(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="Noted: blue."), Reply(echo=True))
    first = client.responses.create(model="agent:helper", input="My colour is blue.")
    second = client.responses.create(model="agent:helper", input="What is my colour?", previous_response_id=first.id)
    assert second.output_text == "What is my colour?"
    contents = [m.get("content") for m in sent_messages(mock_backend)]
    assert "My colour is blue." in contents and "Noted: blue." in contents  # the session's earlier turn
    with httpx.Client(base_url=str(client.base_url).removesuffix("/v1/"), headers=_auth(client)) as http:
        runs = [http.get(f"/v1/runs/{r.metadata['strata_run_id']}").json() for r in (first, second)]
    assert runs[0]["session_id"] == runs[1]["session_id"]
    with pytest.raises(openai.BadRequestError, match="tools"):  # the agent brings its own
        client.responses.create(model="agent:helper", input="hi", tools=[WEATHER])


def test_agent_waiting_for_approval_says_how_to_approve(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("record", {"label": "x"}, id="r1")]), Reply(content="Recorded."))
    response = client.responses.create(model="agent:approver", input="Record x")
    assert response.status == "incomplete"
    details = response.incomplete_details.model_dump()  # type: ignore[union-attr]
    run_id = details["run_id"]
    assert details["reason"] == "awaiting_approval" and f"/v1/runs/{run_id}/approval" in details["message"]
    with httpx.Client(base_url=str(client.base_url).removesuffix("/v1/"), headers=_auth(client)) as http:
        assert http.post(f"/v1/runs/{run_id}/approval", json={"decision": "approve"}).status_code == 200
    for _ in range(100):
        current = client.responses.retrieve(response.id)
        if current.status not in ("incomplete", "queued", "in_progress"):
            break
        time.sleep(0.1)
    assert (current.status, current.output_text) == ("completed", "Recorded.")


def test_agent_model_streams(client: openai.OpenAI, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="Streaming from an agent."))
    with client.responses.stream(model="agent:helper", input="Say something") as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text == "Streaming from an agent."


def _auth(client: openai.OpenAI) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.api_key}"}


# -- the OpenAI Agents SDK, on its default (Responses) path ------------------------------------------------------


def _agents_sdk_agent(strata: StrataProcess) -> tuple[Any, Any]:
    """An agent with a function tool, and the run config that points the SDK's default provider (Responses API,
    the model named by a string) at Strata: no global client is set, so nothing leaks into other tests."""
    from agents import Agent, OpenAIProvider, RunConfig, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # the SDK would export its traces to OpenAI

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return f"sunny in {city}"

    client = openai.AsyncOpenAI(base_url=strata.base_url, api_key=strata.api_key, max_retries=0)
    agent = Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model="mock-model")
    return agent, RunConfig(model_provider=OpenAIProvider(openai_client=client))


def _responses_served(strata: StrataProcess) -> float:
    """`POST /v1/responses` requests answered 200, from Strata's metrics."""
    with strata.client() as http:
        text = http.get("/metrics").text
    prefix = 'strata_requests_total{method="POST",model="mock-model",route="/v1/responses",status="200"}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _script_tool_round(mock: MockBackend) -> None:
    mock.script(
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Rome"}, id="call_r")]),
        Reply(answer_after_tool="It is sunny in Rome."),
    )


def test_agents_sdk_default_path_runs_a_function_tool(strata: StrataProcess, mock_backend: MockBackend) -> None:
    from agents import Runner

    _script_tool_round(mock_backend)
    agent, config = _agents_sdk_agent(strata)
    before = _responses_served(strata)
    result = asyncio.run(Runner.run(agent, "Weather in Rome?", run_config=config))
    assert _responses_served(strata) == before + 2  # both model turns went through /v1/responses
    assert result.final_output == "It is sunny in Rome."
    tool_message = sent_messages(mock_backend)[-1]
    assert tool_message == {"role": "tool", "tool_call_id": "call_r", "content": "sunny in Rome"}


def test_agents_sdk_default_path_streams(strata: StrataProcess, mock_backend: MockBackend) -> None:
    from agents import Runner

    _script_tool_round(mock_backend)

    async def run() -> tuple[Any, list[str]]:
        agent, config = _agents_sdk_agent(strata)
        result = Runner.run_streamed(agent, "Weather in Rome?", run_config=config)
        deltas = [
            event.data.delta
            async for event in result.stream_events()
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"
        ]
        return result.final_output, deltas

    final, deltas = asyncio.run(run())
    assert final == "It is sunny in Rome." and "".join(deltas) == final
