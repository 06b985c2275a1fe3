"""An OpenAI-compatible server in front of one Triton model (KServe v2 gRPC), launched by `TritonDeployment`.

`python -m strata.serving.triton_adapter --port P` with its settings in STRATA_TRITON_SETTINGS (JSON) and the
per-launch bearer token in STRATA_ADAPTER_TOKEN. It owns the translation and nothing else: messages become
the prompt through the configured chat template, `max_tokens` and sampling become Triton's input tensors, a
stream becomes Triton's decoupled `ModelStreamInfer`, and the answers come back as OpenAI chat completions or
chunks. `/health` is Triton's own: server live and ready, and the model ready. Everything else (keys, limits,
retries, breakers, metrics, cost) is Strata's, in the parent process, exactly as for vLLM.

Triton's text models report no token counts: usage is Strata's estimate (`compute.tokens.count_tokens`).
"""

from __future__ import annotations

import argparse
import hmac
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import tritonclient.grpc.aio as triton
from aiohttp import web
from tritonclient.utils import InferenceServerException

from strata.compute.tokens import count_tokens
from strata.serving.chat_templates import STOPS, Template, render

SETTINGS_ENV = "STRATA_TRITON_SETTINGS"
TOKEN_ENV = "STRATA_ADAPTER_TOKEN"
UNSUPPORTED = ("tools", "functions", "logprobs", "response_format")


@dataclass(frozen=True)
class Settings:
    url: str
    triton_model: str
    served_name: str
    chat_template: Template
    input_tensor: str
    output_tensor: str
    max_tokens_tensor: str
    stream_tensor: str
    default_max_tokens: int


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, dumps=lambda v: orjson.dumps(v).decode())


class Adapter:
    def __init__(self, settings: Settings, token: str) -> None:
        self.settings = settings
        self.token = token
        self.client: triton.InferenceServerClient

    async def open(self, _: web.Application) -> None:
        # Made on the server's own event loop: grpc.aio channels belong to the loop that made them.
        self.client = triton.InferenceServerClient(self.settings.url)

    async def close(self, _: web.Application) -> None:
        await self.client.close()

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return _error(401, "this server answers Strata only", code="invalid_api_key")
        return await handler(request)  # type: ignore[no-any-return]

    async def health(self, request: web.Request) -> web.Response:
        """Triton's own readiness: Strata's supervisor (through /v1/models) waits for it before serving."""
        try:
            ready = (
                await self.client.is_server_live()
                and await self.client.is_server_ready()
                and await self.client.is_model_ready(self.settings.triton_model)
            )
        except InferenceServerException as exc:
            return _error(503, f"Triton at {self.settings.url}: {exc.message()}")
        if not ready:
            return _error(503, f"Triton's model {self.settings.triton_model!r} is not ready")
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        unready = await self.health(request)
        if unready.status != 200:
            return unready
        model = {"id": self.settings.served_name, "object": "model", "created": 0, "owned_by": "triton"}
        return web.json_response({"object": "list", "data": [model]})

    def _inputs(self, body: dict[str, Any], stream: bool) -> tuple[list[triton.InferInput], str, int]:
        for field in UNSUPPORTED:
            if body.get(field):
                raise BadRequest(f"{field} is not supported by models served through Triton (kind: triton)", field)
        if (body.get("n") or 1) != 1:
            raise BadRequest("n: models served through Triton answer one choice per request", "n")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: a non-empty list is required", "messages")
        try:
            prompt = render(messages, self.settings.chat_template)
        except (ValueError, AttributeError) as exc:
            raise BadRequest(f"messages: {exc}", "messages") from None
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or self.settings.default_max_tokens
        if not isinstance(limit, int) or limit < 1:
            raise BadRequest("max_tokens: a positive integer", "max_tokens")
        s = self.settings
        text = triton.InferInput(s.input_tensor, [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        tokens = triton.InferInput(s.max_tokens_tensor, [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[limit]], dtype=np.int32))
        streamed = triton.InferInput(s.stream_tensor, [1, 1], "BOOL")
        streamed.set_data_from_numpy(np.array([[stream]], dtype=np.bool_))
        inputs = [text, tokens, streamed]
        for name in ("temperature", "top_p"):
            if isinstance(body.get(name), int | float):
                value = triton.InferInput(name, [1, 1], "FP32")
                value.set_data_from_numpy(np.array([[float(body[name])]], dtype=np.float32))
                inputs.append(value)
        return inputs, prompt, limit

    def _text(self, result: triton.InferResult) -> str:
        output = result.as_numpy(self.settings.output_tensor)
        if output is None:
            return ""
        return "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in output.flatten())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            stream = bool(body.get("stream"))
            inputs, prompt, limit = self._inputs(body, stream)
        except orjson.JSONDecodeError:
            return _error(400, "the body is not JSON")
        except BadRequest as exc:
            return _error(400, str(exc), exc.param)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if stream:
            return await self._stream(request, body, inputs, prompt, ident)
        try:
            result = await self.client.infer(self.settings.triton_model, inputs, request_id=ident)
        except InferenceServerException as exc:
            return _error(502, f"Triton: {exc.message()}", code="backend_error")
        content = _cut(self._text(result), self.settings.chat_template)
        completion = count_tokens(content)
        answer = {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "length" if completion >= limit else "stop"}],
            "usage": _usage(prompt, completion),
        }  # fmt: skip
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def _stream(
        self, request: web.Request, body: dict[str, Any], inputs: list[triton.InferInput], prompt: str, ident: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.settings.served_name}

        async def send(choice: dict[str, Any] | None, **extra: Any) -> None:
            await response.write(b"data: " + orjson.dumps({**base, "choices": [choice] if choice else [], **extra})
                                 + b"\n\n")  # fmt: skip

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.settings.triton_model, "inputs": inputs, "request_id": ident}

        text = ""
        responses = self.client.stream_infer(requests())
        try:
            await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            async for result, error in responses:
                if error is not None:
                    await send(None, error={"message": f"Triton: {error.message()}", "code": "backend_error"})
                    return response
                piece = self._text(result)
                if piece:
                    text += piece
                    await send({"index": 0, "delta": {"content": piece}, "finish_reason": None})
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
            await send({"index": 0, "delta": {}, "finish_reason": "stop"})
            if (body.get("stream_options") or {}).get("include_usage"):
                await send(None, usage=_usage(prompt, count_tokens(text)))
            await response.write(b"data: [DONE]\n\n")
        finally:
            responses.cancel()  # Strata left (or the answer ended): Triton stops generating for nobody
        return response


def _cut(text: str, template: Template) -> str:
    for stop in STOPS[template]:
        text = text.split(stop, 1)[0]
    return text


def _usage(prompt: str, completion: int) -> dict[str, int]:
    prompt_tokens = count_tokens(prompt)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def build(settings: Settings, token: str) -> web.Application:
    adapter = Adapter(settings, token)
    app = web.Application(middlewares=[adapter.auth], client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", adapter.health)
    app.router.add_get("/v1/models", adapter.models)
    app.router.add_post("/v1/chat/completions", adapter.chat)
    app.on_startup.append(adapter.open)
    app.on_cleanup.append(adapter.close)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = Settings(**orjson.loads(os.environ[SETTINGS_ENV]))
    web.run_app(build(settings, os.environ[TOKEN_ENV]), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
