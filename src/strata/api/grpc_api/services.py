"""The strata.v1 services: each RPC is its REST route (named in proto/strata/v1/strata.proto), through `Bridge`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from strata.api.grpc_api.bridge import Bridge, SseEvent
from strata.v1 import strata_pb2 as pb
from strata.v1 import strata_pb2_grpc as rpc

Context = grpc.aio.ServicerContext


def as_dict(message: Message) -> dict[str, Any]:
    # int64 fields become JSON strings in proto3's JSON mapping; Strata's validation takes them as numbers.
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def parsed(data: dict[str, Any], message: Message) -> Any:
    return json_format.ParseDict(data, message, ignore_unknown_fields=True)


def struct(data: dict[str, Any] | None) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    if data:
        value.update(data)
    return value


class Chat(rpc.ChatServicer):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    async def CreateChatCompletion(self, request: pb.ChatCompletionRequest, context: Context) -> pb.ChatCompletion:
        body = as_dict(request)
        answer = await self.bridge.json(context, "POST", "/v1/chat/completions", body)
        return parsed(answer, pb.ChatCompletion())  # type: ignore[no-any-return]

    async def StreamChatCompletion(
        self, request: pb.ChatCompletionRequest, context: Context
    ) -> AsyncIterator[pb.ChatCompletionChunk]:
        body = as_dict(request) | {"stream": True, "stream_options": {"include_usage": True}}
        async for event in self.bridge.events(context, "POST", "/v1/chat/completions", body):
            yield parsed(event.data, pb.ChatCompletionChunk())


class Models(rpc.ModelsServicer):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return parsed(await self.bridge.json(context, "GET", "/v1/models"), pb.ListModelsResponse())  # type: ignore[no-any-return]


def run_message(view: dict[str, Any]) -> pb.Run:
    usage = view.get("usage") or {}
    return pb.Run(
        id=view.get("id", ""),
        agent=view.get("agent", ""),
        session_id=view.get("session_id") or "",
        status=view.get("status", ""),
        status_reason=view.get("status_reason") or "",
        output=view.get("output") or "",
        cost_usd=float(view.get("cost_usd") or 0.0),
        usage=parsed(usage, pb.Usage()),
        detail=struct(view),
    )


def run_event(event: SseEvent) -> pb.RunEvent:
    data = event.data
    return pb.RunEvent(
        seq=int(data.get("seq") or (event.id or 0)),
        type=str(data.get("type") or event.event or ""),
        run_id=str(data.get("run_id") or ""),
        data=struct(data),
    )


class Runs(rpc.RunsServicer):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def _start(self, request: pb.StartRunRequest, context: Context, mode: str) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"input": request.input, "mode": mode}
        if request.session_id:
            body["session_id"] = request.session_id
        wait = request.wait_s if request.HasField("wait_s") else None
        remaining = context.time_remaining()
        if mode == "sync" and remaining is not None:  # a sync run waits no longer than the client will
            wait = min(wait or remaining, max(remaining - 0.05, 0.01))
        if wait is not None:
            body["wait_s"] = wait
        return f"/v1/agents/{quote(request.agent, safe='')}/runs", body

    async def StartRun(self, request: pb.StartRunRequest, context: Context) -> pb.Run:
        mode = request.mode or "sync"
        if mode not in ("sync", "background"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"mode: {mode!r} is sync or background here; "
                                "StartRunStream streams a run")  # fmt: skip
        if not request.agent:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent: required")
        path, body = self._start(request, context, mode)
        return run_message(await self.bridge.json(context, "POST", path, body))

    async def StartRunStream(self, request: pb.StartRunRequest, context: Context) -> AsyncIterator[pb.RunEvent]:
        if not request.agent:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent: required")
        path, body = self._start(request, context, "stream")
        async for event in self.bridge.events(context, "POST", path, body):
            yield run_event(event)

    async def GetRun(self, request: pb.RunRequest, context: Context) -> pb.Run:
        return run_message(await self.bridge.json(context, "GET", f"/v1/runs/{await _id(request.run_id, context)}"))

    async def StreamRunEvents(self, request: pb.StreamRunEventsRequest, context: Context) -> AsyncIterator[pb.RunEvent]:
        run_id = await _id(request.run_id, context)
        query = f"after={request.after_seq}" if request.after_seq else ""
        async for event in self.bridge.events(context, "GET", f"/v1/runs/{run_id}/events", query=query):
            yield run_event(event)

    async def CancelRun(self, request: pb.RunRequest, context: Context) -> pb.Run:
        run_id = await _id(request.run_id, context)
        return run_message(await self.bridge.json(context, "POST", f"/v1/runs/{run_id}/cancel"))

    async def Approve(self, request: pb.ApprovalRequest, context: Context) -> pb.Run:
        run_id = await _id(request.run_id, context)
        body = {k: v for k, v in as_dict(request).items() if k != "run_id"}
        return run_message(await self.bridge.json(context, "POST", f"/v1/runs/{run_id}/approval", body))


class Sessions(rpc.SessionsServicer):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        view = await self.bridge.json(context, "POST", "/v1/sessions", as_dict(request))
        return pb.Session(id=view.get("id", ""), agent=view.get("agent", ""), detail=struct(view))

    async def GetSession(self, request: pb.SessionRequest, context: Context) -> pb.Session:
        session_id = await _id(request.session_id, context, "session_id")
        view = await self.bridge.json(context, "GET", f"/v1/sessions/{session_id}")
        return pb.Session(id=view.get("id", ""), agent=view.get("agent", ""), detail=struct(view))

    async def ListMessages(self, request: pb.SessionRequest, context: Context) -> pb.SessionMessages:
        session_id = await _id(request.session_id, context, "session_id")
        view = await self.bridge.json(context, "GET", f"/v1/sessions/{session_id}/messages")
        return parsed({"data": view.get("data", [])}, pb.SessionMessages())  # type: ignore[no-any-return]


async def _id(value: str, context: Context, field: str = "run_id") -> str:
    if not value:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: required")
    return quote(value, safe="")
