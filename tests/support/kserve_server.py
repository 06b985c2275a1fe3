"""A small KServe v2 gRPC inference server in the shape of a TensorRT-LLM ensemble on Triton, for tests.

Real gRPC and Triton's real protobufs (shipped with tritonclient): text_input (BYTES), max_tokens (INT32),
stream (BOOL) in; text_output (BYTES) out; streams through the decoupled ModelStreamInfer with the
`triton_final_response` parameter, as Triton sends them. It answers "Echo: <the prompt's last user line>",
word by word when streaming, and records what it was sent. Readiness can be held back (`ready`).
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as rpc

from strata.serving.supervisor import free_port

MODEL = "ensemble"


def _bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _read_bytes(raw: bytes) -> list[bytes]:
    values, offset = [], 0
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        values.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return values


@dataclass
class Seen:
    prompt: str
    max_tokens: int
    stream: bool
    extra: dict[str, Any] = field(default_factory=dict)


class Inference(rpc.GRPCInferenceServiceServicer):
    def __init__(self, server: KServeServer) -> None:
        self.s = server

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.s.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.s.ready and request.name == MODEL)

    def _decode(self, request: pb.ModelInferRequest) -> Seen:
        values: dict[str, Any] = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            if tensor.datatype == "BYTES":
                values[tensor.name] = _read_bytes(raw)[0].decode()
            else:
                dtype = {"INT32": np.int32, "BOOL": np.bool_, "FP32": np.float32}[tensor.datatype]
                values[tensor.name] = np.frombuffer(raw, dtype=dtype)[0].item()
        seen = Seen(values.pop("text_input"), values.pop("max_tokens"), values.pop("stream"), values)
        self.s.seen.append(seen)
        return seen

    def _answer(self, seen: Seen) -> list[str]:
        last_user = seen.prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
        return ["Echo:", *last_user.split()][: seen.max_tokens]

    def _response(self, request: pb.ModelInferRequest, text: str, final: bool | None) -> pb.ModelInferResponse:
        output = pb.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=[1, 1])
        response = pb.ModelInferResponse(model_name=MODEL, id=request.id, outputs=[output],
                                         raw_output_contents=[_bytes_tensor([text.encode()])])  # fmt: skip
        if final is not None:
            response.parameters["triton_final_response"].bool_param = final
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        if request.model_name != MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.model_name}'")
        seen = self._decode(request)
        await asyncio.sleep(self.s.latency_s)
        return self._response(request, " ".join(self._answer(seen)), None)

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            seen = self._decode(request)
            words = self._answer(seen)
            self.s.streams_open += 1
            try:
                for index, word in enumerate(words):
                    await asyncio.sleep(self.s.chunk_delay_s)
                    yield pb.ModelStreamInferResponse(infer_response=self._response(request, (" " if index else "")
                                                                                     + word, False))  # fmt: skip
                yield pb.ModelStreamInferResponse(infer_response=self._response(request, "", True))
                self.s.streams_completed += 1
            finally:
                self.s.streams_open -= 1


class KServeServer:
    """Runs in a thread of its own with its own event loop, like tests/support/mock_backend.py."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ready = True
        self.latency_s = 0.0
        self.chunk_delay_s = 0.0
        self.seen: list[Seen] = []
        self.streams_open = 0
        self.streams_completed = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        rpc.add_GRPCInferenceServiceServicer_to_server(Inference(self), self._server)
        self._server.add_insecure_port(self.address)
        await self._server.start()

    def __enter__(self) -> KServeServer:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
