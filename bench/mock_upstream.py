"""A lean, fast OpenAI-compatible upstream for benchmarks (raw asyncio + httptools, uvloop when present).

Unlike `tests/support/mock_backend.py` (scriptable, aiohttp, records every request) this one does the
least work per request, so that it is never what a benchmark measures:

- `POST /v1/chat/completions`: a fixed, precomputed JSON body with `usage` (the same bytes every time), or,
  with `"stream": true`, an SSE stream of `--chunks` chunks `--interval-ms` apart (chunk i is due at
  start + i * interval, so delays do not accumulate), then a usage chunk (when `stream_options.include_usage`)
  and `[DONE]`.
- the same with `tools` in the request: a scripted agent model (`AGENT_TOOL_TURNS` tool calls, then an answer).
  While the conversation holds fewer than `AGENT_TOOL_TURNS` `role: tool` messages it calls the first tool
  with arguments valid for it (different each turn, so no loop guard trips), else it answers with text: a
  5-step agent run is 5 model calls and 4 tool calls. Streamed, every chunk is written at once (no interval):
  the agent scenario measures orchestration, not token pacing.
- `POST /v1/traces`: the local OTLP "collector": answers 200 with an empty protobuf body and discards the spans.
- `GET /_stats`: how many OTLP export requests (and bytes) arrived, to show that tracing export was on.
- any other `GET`: `/v1/models` lists the model; anything else answers `{"status": "ok"}`.

Run it as its own process: `python -m bench.mock_upstream --port 9100 [--chunks 100 --interval-ms 20]`.
It prints `ready <port>` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

import httptools
import orjson

MODEL = "bench-model"
CONTENT = "Hello from the benchmark upstream. " * 3  # ~100 bytes: a "small body"


def _response(status: str, content_type: bytes, body: bytes, keep_alive: bool) -> bytes:
    head = (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + (b"\r\nConnection: keep-alive" if keep_alive else b"\r\nConnection: close")
        + b"\r\n\r\n"
    )
    return head + body


COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 20, "total_tokens": 31},
    }
)
MODELS = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]})
OK = b'{"status":"ok"}'
JSON = b"application/json"
AGENT_TOOL_TURNS = 4
AGENT_USAGE = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
)


def _chunk_frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding frame."""
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def _event(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    event: dict = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
    }
    if usage is not None:
        event["usage"] = usage
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _tool_arguments(tool: dict, turn: int) -> dict:
    """Arguments valid for `tool` that differ by turn: known built-ins by name, else from its JSON Schema."""
    function = tool.get("function") or {}
    name = function.get("name", "")
    if name == "calculator":
        return {"expression": f"{turn + 1} * {turn + 2}"}
    if name == "current_time":
        return {"timezone": ("UTC", "Europe/Paris", "Asia/Tokyo", "America/New_York")[turn % 4]}
    schema = function.get("parameters") or {}
    samples = {"string": f"value {turn}", "integer": turn, "number": turn + 0.5, "boolean": turn % 2 == 0}
    properties = schema.get("properties") or {}
    return {key: samples.get((properties.get(key) or {}).get("type", "string"), f"value {turn}")
            for key in schema.get("required") or ()}  # fmt: skip


def agent_message(request: dict) -> tuple[dict, str]:
    """The scripted agent model's next assistant message and finish reason for a request carrying `tools`."""
    turn = sum(1 for m in request.get("messages") or () if m.get("role") == "tool")
    if turn >= AGENT_TOOL_TURNS:
        return {"role": "assistant", "content": CONTENT}, "stop"
    tool = request["tools"][0]
    call = {
        "id": f"call_bench_{turn}",
        "type": "function",
        "function": {"name": tool["function"]["name"], "arguments": orjson.dumps(_tool_arguments(tool, turn)).decode()},
    }
    return {"role": "assistant", "content": "", "tool_calls": [call]}, "tool_calls"


def agent_completion(request: dict) -> bytes:
    message, finish = agent_message(request)
    choice = {"index": 0, "message": message, "finish_reason": finish}
    body = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
            "choices": [choice], "usage": AGENT_USAGE}  # fmt: skip
    return orjson.dumps(body)


def agent_stream(request: dict, include_usage: bool) -> bytes:
    """The whole SSE response (head and chunked body) of a streamed agent answer, written in one go."""
    message, finish = agent_message(request)
    delta: dict = {"role": "assistant", "content": message["content"]}
    if "tool_calls" in message:
        delta["tool_calls"] = [{"index": 0, **message["tool_calls"][0]}]
    events = _event(delta) + _event({}, finish=finish)
    if include_usage:
        events += _event({}, usage=AGENT_USAGE)
    return STREAM_HEAD + _chunk_frame(events + b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Upstream:
    def __init__(self, chunks: int, interval_s: float) -> None:
        self.chunks = chunks
        self.interval_s = interval_s
        self.trace_posts = 0  # as the OTLP sink: export requests and bytes received (GET /_stats)
        self.trace_bytes = 0
        first = _event({"role": "assistant", "content": "tok "})
        middle = _event({"content": "tok "})
        last = _event({"content": "tok "}, finish="stop")
        frames = [first] + [middle] * max(0, chunks - 2) + ([last] if chunks > 1 else [])
        self.stream_frames = [_chunk_frame(f) for f in frames]
        usage = {"prompt_tokens": 11, "completion_tokens": chunks, "total_tokens": 11 + chunks}
        self.stream_tail_usage = _chunk_frame(_event({}, usage=usage) + b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self.stream_tail = _chunk_frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class _Protocol(asyncio.Protocol):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.stream_task: asyncio.Task | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream_task is not None:
            self.stream_task.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_response("400 Bad Request", JSON, b"{}", False))
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None:
            return
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            try:
                request = orjson.loads(b"".join(self.body)) if self.body else {}
            except orjson.JSONDecodeError:
                transport.write(_response("400 Bad Request", JSON, b'{"error":{"message":"bad json"}}', keep_alive))
                return
            if request.get("tools"):
                if request.get("stream"):
                    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
                    transport.write(agent_stream(request, include_usage))
                else:
                    transport.write(_response("200 OK", JSON, agent_completion(request), keep_alive))
            elif request.get("stream"):
                include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
                self.stream_task = asyncio.get_running_loop().create_task(self._stream(include_usage))
                return
            else:
                transport.write(_response("200 OK", JSON, COMPLETION, keep_alive))
        elif method == b"POST" and path.endswith(b"/v1/traces"):
            self.upstream.trace_posts += 1
            self.upstream.trace_bytes += sum(map(len, self.body))
            transport.write(_response("200 OK", b"application/x-protobuf", b"", keep_alive))
        elif method == b"GET" and path == b"/_stats":
            stats = {"trace_posts": self.upstream.trace_posts, "trace_bytes": self.upstream.trace_bytes}
            transport.write(_response("200 OK", JSON, orjson.dumps(stats), keep_alive))
        elif method == b"GET":
            transport.write(_response("200 OK", JSON, MODELS if path.endswith(b"/models") else OK, keep_alive))
        else:
            transport.write(_response("404 Not Found", JSON, b'{"error":{"message":"not found"}}', keep_alive))
        if not keep_alive:
            transport.close()

    async def _stream(self, include_usage: bool) -> None:
        up = self.upstream
        transport = self.transport
        if transport is None:
            return
        transport.write(STREAM_HEAD)
        start = time.perf_counter()
        for index, frame in enumerate(up.stream_frames):
            if index:
                delay = start + index * up.interval_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if self.transport is None:
                return
            transport.write(frame)
        transport.write(up.stream_tail_usage if include_usage else up.stream_tail)
        self.stream_task = None


async def serve(host: str, port: int, chunks: int, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    upstream = Upstream(chunks, interval_s)
    server = await loop.create_server(lambda: _Protocol(upstream), host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"ready {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=100, help="content chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="time between stream chunks")
    args = parser.parse_args(argv)
    coro = serve(args.host, args.port, args.chunks, args.interval_ms / 1000.0)
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:
            asyncio.run(coro)
        else:
            uvloop.run(coro)
    sys.exit(0)


if __name__ == "__main__":
    main()
