"""Strata's gRPC API against a real `strata serve` (mock backend), with grpcio clients: every RPC, the same
answers and refusals as REST, auth per role, a streamed run resumed from a sequence number, a deadline that
stops the backend call, health and reflection."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from strata.config import ServerConfig
from strata.serving.supervisor import free_port
from strata.v1 import strata_pb2 as pb
from strata.v1 import strata_pb2_grpc as rpc
from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    config = {
        "models": [mock_model(mock_backend)],
        "tools": {"functions": [{"name": "record", "import_path": "tests.support.agent_tools:record_call"}]},
        "agents": [
            {"name": "helper", "model": "mock-model", "system_prompt": "Be brief."},
            {"name": "approver", "model": "mock-model", "tools": ["record"], "require_approval": ["record"]},
        ],
        "runs": {"poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 2, "grpc_port": free_port()},
    }
    side_effects = tmp_path_factory.mktemp("effects") / "calls.log"
    env = {"MOCK_API_KEY": "mock-secret", "TEST_SIDE_EFFECTS_LOG": str(side_effects)}
    process = StrataProcess(tmp_path_factory.mktemp("grpc"), config, env).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


@pytest.fixture(scope="module")
def channel(strata: StrataProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{strata.config['server']['grpc_port']}") as opened:
        grpc.channel_ready_future(opened).result(timeout=10)
        yield opened


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def chat(text: str = "hello", **extra: object) -> pb.ChatCompletionRequest:
    return pb.ChatCompletionRequest(model="mock-model", messages=[pb.ChatMessage(role="user", content=text)], **extra)


def test_chat_unary_and_streamed_answer_as_rest_does(
    strata: StrataProcess, channel: grpc.Channel, mock_backend: MockBackend
) -> None:
    stub = rpc.ChatStub(channel)
    mock_backend.script(Reply(content="the same answer", prompt_tokens=9, completion_tokens=3))
    answer = stub.CreateChatCompletion(chat(max_tokens=16), metadata=auth(strata.api_key), timeout=30)
    mock_backend.script(Reply(content="the same answer", prompt_tokens=9, completion_tokens=3))
    rest = strata.client().post("/v1/chat/completions", json={
        "model": "mock-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}).json()  # fmt: skip
    assert answer.choices[0].message.content == rest["choices"][0]["message"]["content"] == "the same answer"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (9, 3) == (
        rest["usage"]["prompt_tokens"], rest["usage"]["completion_tokens"])  # fmt: skip
    assert answer.model == rest["model"] and answer.choices[0].finish_reason == "stop"
    sent = mock_backend.requests[-2].body
    assert sent is not None and sent["max_tokens"] == 16 and sent["messages"][-1]["content"] == "hello"

    mock_backend.script(Reply(content="one two three", prompt_tokens=4, completion_tokens=3))
    chunks = list(stub.StreamChatCompletion(chat(), metadata=auth(strata.api_key), timeout=30))
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert text.split() == ["one", "two", "three"]
    assert chunks[-1].usage.completion_tokens == 3  # the usage chunk closes the stream


def test_tools_round_trip_through_typed_messages(strata: StrataProcess, channel: grpc.Channel,
                                                 mock_backend: MockBackend) -> None:  # fmt: skip
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"}, id="call_1")]))
    tool = pb.Tool(type="function", function=pb.FunctionDefinition(name="get_weather", description="Weather"))
    tool.function.parameters.update({"type": "object", "properties": {"city": {"type": "string"}}})
    answer = rpc.ChatStub(channel).CreateChatCompletion(chat("weather?", tools=[tool]), metadata=auth(strata.api_key),
                                                        timeout=30)  # fmt: skip
    (call,) = answer.choices[0].message.tool_calls
    assert (call.id, call.function.name, orjson.loads(call.function.arguments)) == ("call_1", "get_weather",
                                                                                      {"city": "Oslo"})  # fmt: skip
    sent = mock_backend.requests[-1].body
    assert sent is not None and sent["tools"][0]["function"]["parameters"]["properties"] == {"city": {"type": "string"}}


def test_errors_carry_the_rest_status_and_message(strata: StrataProcess, channel: grpc.Channel) -> None:
    stub = rpc.ChatStub(channel)
    with pytest.raises(grpc.RpcError) as missing:
        stub.CreateChatCompletion(chat(), timeout=10)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no credentials" in missing.value.details()

    with pytest.raises(grpc.RpcError) as bad:
        stub.CreateChatCompletion(chat(max_tokens=-1), metadata=auth(strata.api_key), timeout=10)
    rest = strata.client().post("/v1/chat/completions", json={
        "model": "mock-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": -1})  # fmt: skip
    assert rest.status_code == 400 and bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details() == rest.json()["error"]["message"]
    trailer = dict(bad.value.trailing_metadata())["strata-error-bin"]
    assert orjson.loads(trailer)["error"]["param"] == rest.json()["error"]["param"]

    with pytest.raises(grpc.RpcError) as unknown:
        stub.CreateChatCompletion(pb.ChatCompletionRequest(model="nope", messages=[pb.ChatMessage(role="user",
                                  content="x")]), metadata=auth(strata.api_key), timeout=10)  # fmt: skip
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_roles_and_key_scopes_hold(strata: StrataProcess, channel: grpc.Channel) -> None:
    auditor = strata.create_key("auditor", name="grpc-auditor")
    with pytest.raises(grpc.RpcError) as refused:
        rpc.ChatStub(channel).CreateChatCompletion(chat(), metadata=auth(auditor), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    scoped = strata.create_key("user", name="grpc-scoped", agents=["helper"])
    with pytest.raises(grpc.RpcError) as other_agent:
        rpc.RunsStub(channel).StartRun(pb.StartRunRequest(agent="approver", input="x"), metadata=auth(scoped),
                                       timeout=10)  # fmt: skip
    assert other_agent.value.code() == grpc.StatusCode.PERMISSION_DENIED
    models = rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=auth(scoped), timeout=10)
    assert "mock-model" in [m.id for m in models.data]
    with pytest.raises(grpc.RpcError) as wrong_key:
        rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=auth("sk-strata-" + "x" * 49), timeout=10)
    assert wrong_key.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_runs_sessions_and_a_stream_resumed_from_a_sequence_number(
    strata: StrataProcess, channel: grpc.Channel, mock_backend: MockBackend
) -> None:
    runs, sessions = rpc.RunsStub(channel), rpc.SessionsStub(channel)
    key = auth(strata.api_key)
    session = sessions.CreateSession(pb.CreateSessionRequest(agent="helper"), metadata=key, timeout=10)
    assert session.agent == "helper" and session.id
    mock_backend.script(Reply(content="first answer"))
    run = runs.StartRun(pb.StartRunRequest(agent="helper", input="hi", session_id=session.id), metadata=key, timeout=30)
    assert (run.status, run.output, run.session_id) == ("completed", "first answer", session.id)
    again = runs.GetRun(pb.RunRequest(run_id=run.id), metadata=key, timeout=10)
    rest = strata.client().get(f"/v1/runs/{run.id}").json()
    assert json_format.MessageToDict(again.detail) == orjson.loads(orjson.dumps(rest))
    messages = sessions.ListMessages(pb.SessionRequest(session_id=session.id), metadata=key, timeout=10)
    assert [(m.role, m.content) for m in messages.data][-2:] == [("user", "hi"), ("assistant", "first answer")]

    mock_backend.script(Reply(content="streamed answer"))
    events = list(runs.StartRunStream(pb.StartRunRequest(agent="helper", input="go"), metadata=key, timeout=30))
    kinds = [e.type for e in events]
    assert kinds[-1] == "run.completed" and events[0].run_id
    durable = [e for e in events if e.seq]
    assert len(durable) >= 2
    middle = durable[len(durable) // 2 - 1].seq
    replay = list(runs.StreamRunEvents(pb.StreamRunEventsRequest(run_id=events[0].run_id, after_seq=middle),
                                       metadata=key, timeout=30))  # fmt: skip
    assert [e.seq for e in replay] == [e.seq for e in durable if e.seq > middle]
    assert replay[-1].type == "run.completed"


def test_approve_and_cancel(strata: StrataProcess, channel: grpc.Channel, mock_backend: MockBackend) -> None:
    runs, key = rpc.RunsStub(channel), auth(strata.api_key)
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("record", {"label": "pay"}, id="call_pay")]),
                        Reply(content="paid"))  # fmt: skip
    run = runs.StartRun(pb.StartRunRequest(agent="approver", input="pay it"), metadata=key, timeout=30)
    assert run.status == "awaiting_approval"
    pending = json_format.MessageToDict(run.detail)["pending_approval"][0]
    with pytest.raises(grpc.RpcError) as stale:
        runs.Approve(pb.ApprovalRequest(run_id=run.id, decision="approve", call_id="call_pay", binding="0" * 32),
                     metadata=key, timeout=10)  # fmt: skip
    assert stale.value.code() == grpc.StatusCode.ABORTED  # 409 stale_approval
    approved = runs.Approve(pb.ApprovalRequest(run_id=run.id, decision="approve", call_id="call_pay",
                                               binding=pending["binding"]), metadata=key, timeout=10)  # fmt: skip
    assert approved.id == run.id
    deadline = time.monotonic() + 20
    while runs.GetRun(pb.RunRequest(run_id=run.id), metadata=key, timeout=10).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    mock_backend.script(Reply(content="slow", latency_s=5))
    background = runs.StartRun(pb.StartRunRequest(agent="helper", input="x", mode="background"), metadata=key,
                               timeout=10)  # fmt: skip
    cancelled = runs.CancelRun(pb.RunRequest(run_id=background.id), metadata=key, timeout=10)
    assert cancelled.id == background.id
    with pytest.raises(grpc.RpcError) as no_run:
        runs.GetRun(pb.RunRequest(run_id="run_missing"), metadata=key, timeout=10)
    assert no_run.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_deadline_ends_the_call_and_the_backend_work(
    strata: StrataProcess, channel: grpc.Channel, mock_backend: MockBackend
) -> None:
    stub = rpc.ChatStub(channel)
    mock_backend.default = Reply(content="too late", latency_s=3)
    with pytest.raises(grpc.RpcError) as late:
        stub.CreateChatCompletion(chat(), metadata=auth(strata.api_key), timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # A stream past its deadline: Strata drops the backend stream, as when an HTTP client leaves.
    mock_backend.default = Reply(content=" ".join(["word"] * 40), chunk_delay_s=0.1)
    received = []
    with pytest.raises(grpc.RpcError) as cut:
        for chunk in stub.StreamChatCompletion(chat(), metadata=auth(strata.api_key), timeout=1.0):
            received.append(chunk)
    assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 0 < len(received) < 40
    deadline = time.monotonic() + 6  # the mock notices the unary call's closed connection after its 3 s
    while mock_backend.disconnects < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mock_backend.disconnects == 2, "a backend call went on after the client's deadline"
    mock_backend.default = Reply()


def test_health_and_reflection(channel: grpc.Channel) -> None:
    checks = health_pb2_grpc.HealthStub(channel)
    for service in ("", "strata.v1.Chat", "strata.v1.Runs"):
        answer = checks.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=5)  # fmt: skip
    names = {s.name for s in reply.list_services_response.service}
    assert {"strata.v1.Chat", "strata.v1.Models", "strata.v1.Runs", "strata.v1.Sessions"} <= names


def test_the_port_must_differ_from_http() -> None:
    with pytest.raises(ValueError, match="give gRPC a port of its own"):
        ServerConfig(port=8000, grpc_port=8000)


def test_a_taken_grpc_port_is_refused_before_start(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "strata.yaml").write_text(f"server: {{port: {free_port()}, grpc_port: {port}}}\n")
        result = subprocess.run([sys.executable, "-m", "strata", "serve", "--config", str(tmp_path / "strata.yaml")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60,
                                env={"PATH": "/usr/bin:/bin", "STRATA_ADMIN_KEY": "k" * 32})  # fmt: skip
    assert result.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in result.stderr + result.stdout
    assert "server.grpc_port" in result.stderr + result.stdout


def test_grpc_speaks_tls_with_the_http_certificate(mock_backend: MockBackend, tmp_path: Path) -> None:
    from tests.integration.test_security_transport import self_signed

    certificate = self_signed(tmp_path)
    grpc_port = free_port()
    config = {"models": [mock_model(mock_backend)], "server": {"drain_delay_s": 0, "grpc_port": grpc_port}}
    server = StrataProcess(tmp_path / "tls", config, {"MOCK_API_KEY": "mock-secret"},
                           args=["--tls-cert", str(certificate.cert), "--tls-key", str(certificate.key)],
                           ca_file=certificate.cert)  # fmt: skip
    (tmp_path / "tls").mkdir()
    server.start()
    try:
        trust = grpc.ssl_channel_credentials(root_certificates=certificate.cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", trust) as secure:
            models = rpc.ModelsStub(secure).ListModels(
                pb.ListModelsRequest(), metadata=auth(server.api_key), timeout=10
            )
            assert "mock-model" in [m.id for m in models.data]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as plain, pytest.raises(grpc.RpcError) as refused:
            rpc.ModelsStub(plain).ListModels(pb.ListModelsRequest(), metadata=auth(server.api_key), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.stop() == 0
