"""Relay a backend's chat-completion (or legacy text-completion) SSE stream to the client as OpenAI sends it.

Events pass through as the bytes the backend sent; only events that mention `usage` are parsed
(Strata always asks the backend for usage so it can meter, and hides that event from clients that
did not ask). Backends that never report usage in streams are counted here instead.

A stream that fails after the response started (the backend dies or stalls, or Strata's shutdown grace
runs out: `interrupt()`) ends with an OpenAI-style error event and no `[DONE]`; `stats.error` keeps
the failure for the caller's metrics and log.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from strata.serving.client import UpstreamStream
from strata.serving.errors import BackendNotReadyError, ServingError, UpstreamUnavailableError
from strata.serving.usage import TOKENS_PER_MESSAGE, TOKENS_REPLY_PRIMER, TokenCounter, Usage

DONE = b"data: [DONE]\n\n"
_USAGE_MARK = b'"usage"'
_FINISH_MARK = b'"finish_reason"'
# A set finish reason, as compact and as spaced JSON write it (most events carry `"finish_reason":null`).
_FINISH_SET = (b'"finish_reason":"', b'"finish_reason": "')


@dataclass
class StreamStats:
    """What the relay observed: the usage to report, what a usage event it adds must carry, and timing.

    `first_chunk_at` / `last_chunk_at` are `time.perf_counter()` readings taken when the first and the
    latest answer event (one with `choices`; a usage-only event does not count) went on to the client.
    The first event is the first token: servers send it (often with only the role) once the prompt is
    processed and the first token decoded.
    """

    usage: Usage | None = None
    chunk_id: str | None = None
    created: int | None = None
    model: str | None = None
    completion_parts: list[str] = field(default_factory=list)
    first_chunk_at: float | None = None
    last_chunk_at: float | None = None
    chunks: int = 0
    error: ServingError | None = None  # why the stream ended without [DONE] (not set when the client left)
    finish_reasons: dict[int, str] = field(default_factory=dict)  # choice index -> why it ended

    def ttft_s(self, started_at: float) -> float | None:
        """Time to first token from `started_at` (a perf_counter reading: when the request arrived)."""
        return None if self.first_chunk_at is None else max(0.0, self.first_chunk_at - started_at)

    def tpot_s(self) -> float | None:
        """Time per output token after the first: (last - first chunk) / (completion tokens - 1).

        None when it cannot be known: no usage, fewer than two completion tokens, or a single chunk.
        """
        if self.usage is None or self.first_chunk_at is None or self.last_chunk_at is None:
            return None
        tokens = self.usage.completion_tokens
        if tokens < 2 or self.last_chunk_at <= self.first_chunk_at:
            return None
        return (self.last_chunk_at - self.first_chunk_at) / (tokens - 1)


class ChatStreamRelay:
    def __init__(
        self,
        stream: UpstreamStream,
        *,
        client_wants_usage: bool,
        backend_reports_usage: bool,
        prompt_tokens: Callable[[], Awaitable[int]],
        counter: TokenCounter,
    ) -> None:
        self._stream = stream
        self._client_wants_usage = client_wants_usage
        # A backend that reports usage needs no per-chunk parsing; otherwise we must see the text.
        # Events of a backend that should report usage are kept unparsed, in case it does not.
        self._count_locally = not backend_reports_usage
        self._unparsed: list[bytes] = []
        self._prompt_tokens = prompt_tokens
        self._counter = counter
        self.stats = StreamStats()
        self.model = ""  # the model that answers (set by the chat service: a fallback may stand in)
        self.chunk_object = "chat.completion.chunk"  # the `object` of a usage event it adds
        self._interrupted: ServingError | None = None

    @property
    def deployment(self) -> str:
        return self._stream.deployment

    def interrupt(self, error: ServingError) -> None:
        """End the stream now with `error` as its error event (e.g. Strata is shutting down).

        Closing the upstream response fails the pending read at once, so this costs the relay's hot loop nothing.
        """
        if self._interrupted is None:
            self._interrupted = error
            self._stream.close()

    @property
    def busy_s(self) -> float:
        """The stream's share of its deployment's busy time, once the stream is closed."""
        return self._stream.busy_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        buffer = b""
        data_lines: list[bytes] = []
        try:
            async for chunk in self._stream.chunks():
                buffer += chunk
                while (newline := buffer.find(b"\n")) >= 0:
                    line = buffer[:newline].rstrip(b"\r")
                    buffer = buffer[newline + 1 :]
                    if line:
                        if line.startswith(b"data:"):
                            data_lines.append(line[6:] if line[5:6] == b" " else line[5:])
                        continue  # comments, `event:`, `id:` and `retry:` lines are not OpenAI's
                    if not data_lines:
                        continue
                    payload = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
                    data_lines = []
                    if payload == b"[DONE]":
                        async for tail in self._finish():
                            yield tail
                        return
                    out = self._on_event(payload)
                    if out is not None:
                        yield out
            # The backend closed without [DONE]: tell the client the answer is cut short.
            cut = UpstreamUnavailableError(
                "the backend ended the stream before it was complete", deployment=self._stream.deployment
            )
            yield self._fail(cut)
        except ServingError as exc:
            yield self._fail(exc)
        finally:
            self._stream.close()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The stream's chunks as parsed objects, for an in-process reader (an agent's model step): each piece the
        relay yields is one whole event, so nothing is re-split. An error event raises as an upstream failure; the
        stream ends at [DONE] (one that ends without it raises too). Closes the stream when the reader stops."""
        pieces = self.__aiter__()
        try:
            async for piece in pieces:
                data = piece[6:-2]  # b"data: " ... b"\n\n"
                if data == b"[DONE]":
                    return
                event = orjson.loads(data.replace(b"\ndata: ", b"\n"))
                if isinstance(event, dict) and "error" in event:
                    error = event["error"] or {}
                    raise UpstreamUnavailableError(
                        str(error.get("message", "stream failed")), deployment=error.get("deployment")
                    )
                yield event
            raise UpstreamUnavailableError("the stream ended without [DONE]", deployment=self.deployment)
        finally:
            await pieces.aclose()  # closes the upstream stream (and frees its admission slot) now

    def _fail(self, error: ServingError) -> bytes:
        error = self.stats.error = self._interrupted or error  # an interruption is why the read failed
        return _error_event(error)

    def _on_event(self, payload: bytes) -> bytes | None:
        stats = self.stats
        if stats.chunk_id is None:
            self._remember_ids(payload)
        if _USAGE_MARK in payload:
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                event = None  # not ours to judge: pass it on as the backend sent it
            usage = event.get("usage") if isinstance(event, dict) else None
            if isinstance(usage, dict) and all(
                isinstance(usage.get(k, 0), int) for k in ("prompt_tokens", "completion_tokens")
            ):
                self._unparsed.clear()
                stats.usage = Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
                if not event.get("choices"):
                    return _sse(payload) if self._client_wants_usage else None
        if _FINISH_MARK in payload and any(mark in payload for mark in _FINISH_SET):
            self._remember_finish(payload)  # the last event of each choice: parsed, the others are not
        if self._count_locally:
            self._collect_text(payload)
        else:
            self._unparsed.append(payload)
        now = time.perf_counter()
        if stats.first_chunk_at is None:
            stats.first_chunk_at = now
        stats.last_chunk_at = now
        stats.chunks += 1
        return _sse(payload)

    def _remember_ids(self, payload: bytes) -> None:
        """The first event's id, time and model, for a usage event Strata may have to add."""
        self.stats.chunk_id = "chatcmpl-strata"
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            self.stats.chunk_id = str(event.get("id") or self.stats.chunk_id)
            self.stats.created = event.get("created")
            self.stats.model = event.get("model")

    def _remember_finish(self, payload: bytes) -> None:
        for choice in _choices(payload):
            if isinstance(choice.get("finish_reason"), str):
                index = choice.get("index", 0)
                self.stats.finish_reasons[index if isinstance(index, int) else 0] = choice["finish_reason"]

    def _collect_text(self, payload: bytes) -> None:
        for choice in _choices(payload):
            if isinstance(choice.get("text"), str):  # a legacy text completion's chunk
                self.stats.completion_parts.append(choice["text"])
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.stats.completion_parts.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                self.stats.completion_parts.append((function.get("name") or "") + (function.get("arguments") or ""))

    async def _finish(self) -> AsyncIterator[bytes]:
        stats = self.stats
        if stats.usage is None:
            for payload in self._unparsed:
                self._collect_text(payload)
            completion = await self._counter.count("".join(stats.completion_parts))
            stats.usage = Usage(await self._prompt_tokens(), completion)
            if self._client_wants_usage:
                yield b"data: " + orjson.dumps(self._usage_event(stats.usage)) + b"\n\n"
        yield DONE

    def _usage_event(self, usage: Usage) -> dict[str, object]:
        return {
            "id": self.stats.chunk_id,
            "object": self.chunk_object,
            "created": self.stats.created or int(time.time()),
            "model": self.stats.model or "",
            "choices": [],
            "usage": usage.as_dict(),
        }


def _choices(payload: bytes) -> list[dict[str, Any]]:
    """The choices of an event; none if it is not the JSON of a chunk."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return []
    choices = event.get("choices") if isinstance(event, dict) else None
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _sse(payload: bytes) -> bytes:
    if b"\n" in payload:  # an event that came as several data lines goes out as several again
        payload = payload.replace(b"\n", b"\ndata: ")
    return b"data: " + payload + b"\n\n"


def _error_event(exc: ServingError) -> bytes:
    kind = "server_error" if isinstance(exc, BackendNotReadyError) else "upstream_error"  # Strata's own failure
    error = {"message": exc.message, "type": kind, "code": exc.code, "param": None}
    if exc.deployment:
        error["deployment"] = exc.deployment
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


async def prompt_tokens_estimate(text: str, messages: int, counter: TokenCounter) -> int:
    return await counter.count(text) + TOKENS_PER_MESSAGE * messages + TOKENS_REPLY_PRIMER
