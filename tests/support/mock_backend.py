"""A real OpenAI-compatible HTTP server for tests, chaos tests and benchmarks, scriptable per test.

Each request takes the next scripted `Reply` (or the default one): fixed text or tool calls,
chunked streaming with chosen inter-chunk delays, latency, error statuses with `Retry-After`, hangs,
connection resets before the headers or mid-stream, and streams cut off without `[DONE]`.
Faults for chaos tests come before the script: `when({...}, reply)` answers requests whose body has
those values (a request-caused error, e.g. `llama_cpp_assertion()` for `tool_choice: "required"`),
and `error_rate` fails a seeded share of the rest (with `error_status` and `error_retry_after`).

In-process (tests): `with MockBackend() as mock: mock.script(Reply(...)); ... mock.requests`.
Separate process (benchmarks): `python -m tests.support.mock_backend --port 9100`, scripted over
HTTP with `POST /_mock/script` (a JSON list of replies), `POST /_mock/reset`, `GET /_mock/requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import math
import random
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

_ids = itertools.count(1)


@dataclass
class ToolCallSpec:
    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None

    def arguments_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else orjson.dumps(self.arguments).decode()


@dataclass
class Reply:
    """What the mock does with one request."""

    content: str | None = "Hello from the mock backend."
    tool_calls: list[ToolCallSpec] | None = None
    echo: bool = False  # reply with the last user message instead of `content`
    answer_after_tool: str | None = None  # if the last message is a tool result, answer this instead
    finish_reason: str | None = None  # default: "tool_calls" with tool calls, else "stop"
    status: int = 200
    error_message: str = "mock failure"
    error_param: str | None = None
    error_body: dict[str, Any] | None = None  # answered as it is instead of the mock's own error shape
    retry_after: str | None = None
    latency_s: float = 0.0  # before the response headers
    chunks: int | None = None  # streaming: split the content into this many chunks (default: per word)
    chunk_delay_s: float = 0.0
    hang: bool = False  # never answer (until the client gives up)
    reset: Literal["before_headers", "mid_stream"] | None = None
    stop_after_chunks: int | None = None  # streaming: close cleanly after N chunks, without [DONE]
    usage: bool = True  # report usage (non-streaming, and streaming when asked for)
    prompt_tokens: int = 11
    completion_tokens: int | None = None  # default: one per content chunk


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    received_at: float


class MockBackend:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.default = Reply()
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0  # streams the client abandoned before the end
        self.completed_streams = 0
        self.in_flight = 0
        self.models = ["mock-model"]
        # Fault knobs for chaos tests, applied before the script: a seeded share of requests fail.
        self.error_rate = 0.0
        self.error_status = 500
        self.error_retry_after: str | None = None
        self.rules: list[tuple[dict[str, Any], Reply]] = []  # (body values to match, what to answer)
        self._rng = random.Random(1234)
        self.chat_attempts = 0  # every chat request that reached the mock, failed or not
        self.embeddings_usage = True  # report usage in embeddings answers
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopped = threading.Event()

    # -- scripting -------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def when(self, match: dict[str, Any], reply: Reply) -> None:
        """Answer `reply` to every request whose body has these values, whatever else is scripted."""
        with self._lock:
            self.rules.append((match, reply))

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.default = Reply()
            self.disconnects = 0
            self.completed_streams = 0
            self.error_rate = 0.0
            self.error_retry_after = None
            self.rules.clear()
            self.chat_attempts = 0
            self.embeddings_usage = True

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            for match, reply in self.rules:
                if all(body.get(key) == value for key, value in match.items()):
                    return reply
            if self.error_rate and self._rng.random() < self.error_rate:
                return Reply(
                    status=self.error_status, error_message="injected fault", retry_after=self.error_retry_after
                )
            return self._script.popleft() if self._script else self.default

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # -- running ---------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/completions", self._text_completion)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/_mock/script", self._control_script)
        app.router.add_post("/_mock/reset", self._control_reset)
        app.router.add_get("/_mock/requests", self._control_requests)
        return app

    async def start_async(self) -> None:
        self._runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> MockBackend:
        """Run on a private event loop in a daemon thread, so blocking test code can drive it."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as exc:  # surfaced to the caller below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            pending = asyncio.all_tasks(loop)  # handlers still hanging or sleeping by script
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()
            self._stopped.set()

        self._thread = threading.Thread(target=run, name="mock-backend", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> MockBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers --------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        self._record(request, None)
        if not self._authorised(request):
            return _error(401, "invalid api key")
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    def _record(self, request: web.Request, body: dict[str, Any] | None) -> None:
        self.requests.append(
            RecordedRequest(request.method, request.path, dict(request.headers), body, time.monotonic())
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "body is not JSON")
        self._record(request, body)
        self.chat_attempts += 1
        if not self._authorised(request):
            return _error(401, "invalid api key")
        reply = self._next_reply(body)
        self.in_flight += 1
        try:
            return await self._answer(request, body, reply)
        finally:
            self.in_flight -= 1

    async def _embeddings(self, request: web.Request) -> web.Response:
        """Bag-of-words vectors (texts sharing words are close); `when()` rules with an error status apply."""
        body = orjson.loads(await request.read())
        self._record(request, body)
        if not self._authorised(request):
            return _error(401, "invalid api key")
        for match, reply in self.rules:
            if reply.status >= 400 and all(body.get(key) == value for key, value in match.items()):
                return _error(reply.status, reply.error_message, reply.error_param)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dimensions = body.get("dimensions") or 64
        data = []
        for index, text in enumerate(inputs):
            vector = _bag_of_words(text if isinstance(text, str) else " ".join(map(str, text)), dimensions)
            encoded: object = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        answer: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
        if self.embeddings_usage:
            tokens = sum(len(str(text).split()) for text in inputs)
            answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response(answer)

    async def _text_completion(self, request: web.Request) -> web.StreamResponse:
        """Legacy completions: the scripted reply's content as the text (after the prompt when `echo`)."""
        body = orjson.loads(await request.read())
        self._record(request, body)
        if not self._authorised(request):
            return _error(401, "invalid api key")
        reply = self._next_reply(body)
        if reply.status >= 400:
            return _error(reply.status, reply.error_message, reply.error_param)
        text = reply.content or ""
        if body.get("echo") and isinstance(body.get("prompt"), str):
            text = body["prompt"] + text
        head = {"id": f"cmpl-mock{next(_ids)}", "object": "text_completion", "created": int(time.time())}
        head["model"] = body.get("model", "")
        pieces = _split(text, reply.chunks)
        usage = _usage(reply, len(pieces))
        if not body.get("stream"):
            answer = {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}]}
            return web.json_response({**answer, **({"usage": usage} if reply.usage else {})})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, piece in enumerate(pieces):
            finish = "stop" if index == len(pieces) - 1 else None
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
            await response.write(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
        if reply.usage and (body.get("stream_options") or {}).get("include_usage"):
            await response.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _answer(self, request: web.Request, body: dict[str, Any], reply: Reply) -> web.StreamResponse:
        if reply.hang:
            await asyncio.sleep(3600)
        if reply.latency_s:
            await asyncio.sleep(reply.latency_s)
            if request.transport is None or request.transport.is_closing():
                self.disconnects += 1  # the client gave up while we were "thinking"
                return web.Response()
        if reply.reset == "before_headers":
            _abort(request)
            return web.Response()
        if reply.status >= 400:
            headers = {"Retry-After": reply.retry_after} if reply.retry_after else None
            if reply.error_body is not None:
                return web.json_response(reply.error_body, status=reply.status, headers=headers)
            return _error(reply.status, reply.error_message, reply.error_param, headers)
        messages = body.get("messages") or [{}]
        if reply.answer_after_tool is not None and messages[-1].get("role") == "tool":
            reply = Reply(content=reply.answer_after_tool, latency_s=0, usage=reply.usage)
        content = _last_user_text(body) if reply.echo else reply.content
        if body.get("stream"):
            return await self._stream(request, body, reply, content)
        return web.Response(body=orjson.dumps(_completion(body, reply, content)), content_type="application/json")

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply, content: str | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk_id, created, model = f"chatcmpl-mock{next(_ids)}", int(time.time()), body.get("model", "")
        events = _stream_events(reply, content)
        sent = 0
        try:
            for index, delta in enumerate(events):
                if reply.stop_after_chunks is not None and index >= reply.stop_after_chunks:
                    await response.write_eof()
                    return response
                if reply.reset == "mid_stream" and index == max(1, len(events) // 2):
                    _abort(request)
                    return response
                if index and reply.chunk_delay_s:
                    await asyncio.sleep(reply.chunk_delay_s)
                finish = delta.pop("_finish", None)
                event = {
                    "id": chunk_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
                sent += 1
            wants_usage = (body.get("stream_options") or {}).get("include_usage")
            if reply.usage and wants_usage:
                usage = _usage(reply, max(0, sent - 2))
                event = {
                    "id": chunk_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.completed_streams += 1
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return response

    # -- control API -----------------------------------------------------------------------

    async def _control_script(self, request: web.Request) -> web.Response:
        items = orjson.loads(await request.read())
        replies = []
        for item in items if isinstance(items, list) else [items]:
            calls = [ToolCallSpec(**c) for c in item.pop("tool_calls", None) or []] or None
            replies.append(Reply(**item, tool_calls=calls))
        if request.query.get("default") == "1" and replies:
            self.default = replies[0]
        else:
            self.script(*replies)
        return web.json_response({"scripted": len(replies)})

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _control_requests(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps([asdict(r) for r in self.requests]), content_type="application/json")


def llama_cpp_assertion() -> Reply:
    """What llama-cpp-python's server (0.3.x) answers when an `assert` on the input fails, e.g. its
    chatml-function-calling handler given `tool_choice: "required"`: 500, and str(AssertionError()) is ""."""
    body = {"error": {"message": "", "type": "internal_server_error", "param": None, "code": None}}
    return Reply(status=500, error_body=body)


def llama_cpp_value_error(message: str) -> Reply:
    """llama-cpp-python's answer to a ValueError on the input, e.g. "Tool with name 'g' not found in tools"."""
    error = {"message": message, "type": "internal_server_error", "param": None, "code": None}
    return Reply(status=500, error_body={"error": error})


def fastapi_validation_error(loc: list[str | int], msg: str) -> Reply:
    """A FastAPI server's 422 for a body that fails its schema (vLLM, TGI and many proxies are FastAPI)."""
    return Reply(status=422, error_body={"detail": [{"type": "value_error", "loc": ["body", *loc], "msg": msg}]})


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    payload = {"error": {"message": message, "type": "mock_error", "param": param, "code": None}}
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers)


def _bag_of_words(text: str, dimensions: int) -> list[float]:
    vector = [0.0] * dimensions
    for word in text.lower().split():
        vector[zlib.crc32(word.strip(".,!?").encode()) % dimensions] += 1.0
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def _split(text: str, parts: int | None) -> list[str]:
    if not text:
        return []
    if parts is None:
        words = text.split(" ")
        return [w if i == len(words) - 1 else w + " " for i, w in enumerate(words)]
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _finish_reason(reply: Reply) -> str:
    return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")


def _stream_events(reply: Reply, content: str | None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    if reply.tool_calls:
        for index, call in enumerate(reply.tool_calls):
            events.append(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call.id or f"call_{index}",
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""},
                        }
                    ]
                }
            )
            for piece in _split(call.arguments_json(), reply.chunks or 3):
                events.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    else:
        events.extend({"content": piece} for piece in _split(content or "", reply.chunks))
    events.append({"_finish": _finish_reason(reply)})
    return events


def _usage(reply: Reply, content_chunks: int) -> dict[str, int]:
    completion = reply.completion_tokens if reply.completion_tokens is not None else max(1, content_chunks)
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": reply.prompt_tokens + completion,
    }


def _completion(body: dict[str, Any], reply: Reply, content: str | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None if reply.tool_calls else content}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id or f"call_{i}",
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json()},
            }
            for i, call in enumerate(reply.tool_calls)
        ]
    result: dict[str, Any] = {
        "id": f"chatcmpl-mock{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(reply)}],
    }
    if reply.usage:
        result["usage"] = _usage(reply, len(_split(content or "", reply.chunks)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Strata's mock OpenAI-compatible backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    mock = MockBackend(args.host, args.port, args.api_key)
    with contextlib.suppress(KeyboardInterrupt):
        web.run_app(mock.build_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
