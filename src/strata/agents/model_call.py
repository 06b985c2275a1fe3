"""One model step of a run, through `serving` like any client: streamed (token deltas go to live
subscribers), waiting out backpressure, falling back to the agent's fallback model on failure.

Each attempt is a `chat {model}` span under the run's `invoke_agent` span; waits, retries and the
fallback are events of the `invoke_agent` span."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from strata.cost.prices import ModelUse
from strata.observability import tracing_genai as genai
from strata.observability.tracing import Span, Tracing, activate, add_event
from strata.resilience.retry import backoff
from strata.serving.chat import ChatCall, ChatService
from strata.serving.errors import (
    BackendNotReadyError,
    CircuitOpenError,
    ModelNotFoundError,
    ServingError,
    UpstreamStatusError,
    UpstreamUnavailableError,
)
from strata.serving.schemas import ChatCompletionRequest

WaitHook = Callable[[str, float], Awaitable[None]]
DeltaHook = Callable[[str], None]
FallbackHook = Callable[[str, str, str], Awaitable[None]]
MAX_FAILURES_PER_MODEL = 3
BACKOFF_MAX_S = 10.0  # the longest wait between a model step's attempts


class ModelStepError(Exception):
    """The model could not produce an answer for this step (after retries and fallback)."""


class DeadlineExceeded(Exception):
    pass


@dataclass
class ModelOutcome:
    message: dict[str, Any]
    model: str  # the model that answered
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    busy_s: float = 0.0  # its share of the deployment's busy time, priced like a chat completion's

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return list(self.message.get("tool_calls") or [])

    @property
    def use(self) -> ModelUse:
        """What the step used, priced by the same path as a client's chat completion."""
        return ModelUse(self.model, self.prompt_tokens, self.completion_tokens, busy_s=self.busy_s)


@dataclass
class _Assembly:
    """Builds the assistant message from stream chunks."""

    content: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any], on_delta: DeltaHook) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
                on_delta(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = self.calls.setdefault(
                    call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def message(self, id_prefix: str) -> dict[str, Any]:
        # "" rather than null beside tool calls: some servers (llama-cpp-python) refuse a null content.
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.calls:
            calls = [self.calls[i] for i in sorted(self.calls)]
            for index, call in enumerate(calls):
                call["id"] = call["id"] or f"call_{id_prefix}_{index}"
            message["tool_calls"] = calls
        return message


class ModelCaller:
    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    @property
    def tracing(self) -> Tracing:
        return self._chat.tracing

    def provider_name(self, model: str) -> str | None:
        return self._chat.provider_name(model)

    async def call(
        self,
        *,
        agent: str,
        models: list[str],
        allowed: frozenset[str] | None = None,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        temperature: float | None,
        max_tokens: int | None,
        deadline: float,
        call_id: str,
        on_delta: DeltaHook,
        on_wait: WaitHook,
        on_fallback: FallbackHook,
    ) -> ModelOutcome:
        payload: dict[str, Any] = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        if tools:
            payload["tools"] = tools
            payload["tool_choice"] = "auto"
        if temperature is not None:
            payload["temperature"] = temperature
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        last_error: Exception | None = None
        for index, model in enumerate(models):
            if index > 0:
                add_event(genai.EVENT_RUN_FALLBACK, {"from": models[index - 1], "to": model, "error": str(last_error)})
                await on_fallback(models[index - 1], model, str(last_error))
            try:
                return await self._with_retries(agent, model, payload, deadline, call_id, on_delta, on_wait, allowed)
            except ModelStepError as exc:
                last_error = exc
        raise ModelStepError(str(last_error))

    async def _with_retries(
        self,
        agent: str,
        model: str,
        payload: dict[str, Any],
        deadline: float,
        call_id: str,
        on_delta: DeltaHook,
        on_wait: WaitHook,
        allowed: frozenset[str] | None,
    ) -> ModelOutcome:
        failures = waits = 0
        while True:
            try:
                return await self._stream_once(agent, model, payload, call_id, on_delta, allowed)
            except (ModelNotFoundError, CircuitOpenError) as exc:
                # Nothing to wait for when every breaker is open: the fallback model, if any, takes over.
                raise ModelStepError(exc.message) from None
            except ServingError as exc:
                if _is_backpressure(exc):
                    # The deployment is refusing work for now: wait (visibly), do not fail the run.
                    delay = _retry_after(exc) or backoff(waits + 1, 0.25, BACKOFF_MAX_S)
                    waits += 1
                    if time.monotonic() + delay >= deadline:
                        raise DeadlineExceeded(f"model {model!r} stayed overloaded until the run's deadline") from None
                    add_event(
                        genai.EVENT_RUN_WAITING, {"model": model, "delay_s": round(delay, 3), "error": exc.message}
                    )
                    await on_wait(f"model {model!r} is busy: {exc.message}", delay)
                    await asyncio.sleep(delay)
                    continue
                if isinstance(exc, UpstreamStatusError) and 400 <= exc.status < 500:
                    raise ModelStepError(f"model {model!r} rejected the request: {exc.message}") from None
                failures += 1
                if failures >= MAX_FAILURES_PER_MODEL:
                    raise ModelStepError(f"model {model!r} failed {failures} times: {exc.message}") from None
                delay = backoff(failures + 1, 0.25, BACKOFF_MAX_S)
                if time.monotonic() + delay >= deadline:
                    raise ModelStepError(f"model {model!r} failed: {exc.message}") from None
                add_event(
                    genai.EVENT_RUN_RETRY,
                    {"model": model, "attempt": failures, "delay_s": round(delay, 3), "error": exc.message},
                )
                await asyncio.sleep(delay)

    async def _stream_once(
        self,
        agent: str,
        model: str,
        payload: dict[str, Any],
        call_id: str,
        on_delta: DeltaHook,
        allowed: frozenset[str] | None,
    ) -> ModelOutcome:
        body = {**payload, "model": model}
        if body.get("tools") and not self._chat.streams_tool_calls(model):
            return await self._complete_once(agent, body, model, call_id, on_delta, allowed)
        request = ChatCompletionRequest.model_validate(body)
        with activate(self._chat.start_span(model, body)) as span:
            relay = await self._chat.open_stream(ChatCall(request, body, agent=agent, allowed=allowed), {}, span=span)
            assembly = _Assembly()
            buffer = b""
            pieces = relay.__aiter__()
            done = False
            try:
                async for piece in pieces:
                    buffer += piece
                    while (end := buffer.find(b"\n\n")) >= 0:
                        event, buffer = buffer[:end], buffer[end + 2 :]
                        data = event.removeprefix(b"data: ")
                        if data == b"[DONE]":
                            done = True
                            break
                        chunk = orjson.loads(data)
                        if "error" in chunk:
                            raise _stream_error(chunk["error"])
                        assembly.add(chunk, on_delta)
                    if done:
                        break
            finally:
                await pieces.aclose()  # closes the upstream stream (and frees its admission slot) now
            if not done:
                raise _stream_error({"message": "the stream ended without [DONE]"})
            # Closed: its share of the deployment's busy time is known now.
            outcome = _outcome(assembly, relay.model or model, call_id, relay.busy_s)
            _record(span, outcome, relay.stats.model, self.tracing.capture_content)
            return outcome

    async def _complete_once(
        self,
        agent: str,
        body: dict[str, Any],
        model: str,
        call_id: str,
        on_delta: DeltaHook,
        allowed: frozenset[str] | None,
    ) -> ModelOutcome:
        """For backends that cannot stream while choosing tools: one answer, one delta."""
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        request = ChatCompletionRequest.model_validate(body)
        with activate(self._chat.start_span(model, body)) as span:  # the chat service records the reply on it
            completion = await self._chat.complete(ChatCall(request, body, agent=agent, allowed=allowed), {}, span=span)
        reply = orjson.loads(completion.body)
        choice = (reply.get("choices") or [{}])[0]
        message = dict(choice.get("message") or {"role": "assistant", "content": ""})
        message = {k: v for k, v in message.items() if k in ("role", "content", "tool_calls")}
        message["content"] = message.get("content") or ""
        for index, call in enumerate(message.get("tool_calls") or []):
            call["id"] = call.get("id") or f"call_{call_id}_{index}"
        if message.get("content"):
            on_delta(message["content"])
        usage = reply.get("usage") or {}
        return ModelOutcome(
            message=message,
            model=completion.model or model,  # the model that answered (a route may pick one), as chat prices it
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=choice.get("finish_reason"),
            busy_s=completion.busy_s,
        )


def _record(span: Span, outcome: ModelOutcome, response_model: str | None, content: bool) -> None:
    """What a streamed answer tells its `chat` span (the chat service added the backend's name)."""
    if not span.is_recording():
        return
    attributes: dict[str, Any] = {
        genai.INPUT_TOKENS: outcome.prompt_tokens,
        genai.OUTPUT_TOKENS: outcome.completion_tokens,
        genai.FINISH_REASONS: [outcome.finish_reason or ""],
    }
    if response_model:
        attributes[genai.RESPONSE_MODEL] = response_model
    if content:
        attributes[genai.OUTPUT_MESSAGES] = genai.output_messages([outcome.message], [outcome.finish_reason])
    span.set_attributes(attributes)


def _outcome(assembly: _Assembly, model: str, call_id: str, busy_s: float) -> ModelOutcome:
    usage = assembly.usage or {}
    return ModelOutcome(
        message=assembly.message(call_id),
        model=model,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        finish_reason=assembly.finish_reason,
        busy_s=busy_s,
    )


def _stream_error(error: dict[str, Any]) -> ServingError:
    return UpstreamUnavailableError(str(error.get("message", "stream failed")), deployment=error.get("deployment"))


def _is_backpressure(exc: ServingError) -> bool:
    if isinstance(exc, BackendNotReadyError):
        return True
    return isinstance(exc, UpstreamStatusError) and exc.status in (429, 503)


def _retry_after(exc: ServingError) -> float | None:
    if isinstance(exc, BackendNotReadyError):
        return exc.retry_after_s
    if isinstance(exc, UpstreamStatusError) and exc.retry_after:
        try:
            return min(60.0, max(0.0, float(exc.retry_after)))
        except ValueError:
            return None
    return None
