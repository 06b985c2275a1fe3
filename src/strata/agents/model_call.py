"""One model step of a run, through `serving` like any client: streamed (token deltas go to live subscribers)
from the relay's parsed chunks. Retries and fallbacks are the dispatcher's own chain, with the agent's fallback
model added after the model's own fallbacks (the run records a `run.fallback` event when it takes over). What the
run adds is patience: when every deployment refuses work for now (429/503, not ready), it waits and asks again
(visibly: `run.waiting`) until its deadline, rather than failing.

Each step is a `chat {model}` span under the run's `invoke_agent` span; the dispatcher's retries and fallbacks
are events of it, the run's waits events of the `invoke_agent` span."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
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
)
from strata.serving.schemas import ChatCompletionRequest

WaitHook = Callable[[str, float], Awaitable[None]]
DeltaHook = Callable[[str], None]
FallbackHook = Callable[[str, str, str], None]
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
        model, fallbacks = models[0], tuple(models[1:])  # the fallback joins the dispatcher's chain
        waits = 0
        while True:
            try:
                return await self._stream_once(
                    agent, model, fallbacks, payload, call_id, on_delta, allowed, on_fallback
                )
            except (ModelNotFoundError, CircuitOpenError) as exc:
                raise ModelStepError(exc.message) from None
            except ServingError as exc:
                if not _is_backpressure(exc):
                    if isinstance(exc, UpstreamStatusError) and 400 <= exc.status < 500:
                        raise ModelStepError(f"model {model!r} rejected the request: {exc.message}") from None
                    raise ModelStepError(f"model {model!r} failed: {exc.message}") from None
                # Every deployment (and fallback) refuses work for now: the run waits (visibly), it does not fail.
                waits += 1
                delay = _retry_after(exc) or backoff(waits, 0.25, BACKOFF_MAX_S)
                if time.monotonic() + delay >= deadline:
                    raise DeadlineExceeded(f"model {model!r} stayed overloaded until the run's deadline") from None
                add_event(genai.EVENT_RUN_WAITING, {"model": model, "delay_s": round(delay, 3), "error": exc.message})
                await on_wait(f"model {model!r} is busy: {exc.message}", delay)
                await asyncio.sleep(delay)

    async def _stream_once(
        self,
        agent: str,
        model: str,
        fallbacks: tuple[str, ...],
        payload: dict[str, Any],
        call_id: str,
        on_delta: DeltaHook,
        allowed: frozenset[str] | None,
        on_fallback: FallbackHook,
    ) -> ModelOutcome:
        body = {**payload, "model": model}
        call = ChatCall(ChatCompletionRequest.model_validate(body), body, agent=agent, allowed=allowed,
                        fallbacks=fallbacks, on_fallback=on_fallback)  # fmt: skip
        if body.get("tools") and not self._chat.streams_tool_calls(model):
            return await self._complete_once(call, model, call_id, on_delta)
        with activate(self._chat.start_span(model, body)) as span:
            relay = await self._chat.open_stream(call, {}, span=span)
            assembly = _Assembly()
            async for chunk in relay.events():
                assembly.add(chunk, on_delta)
            # Closed: its share of the deployment's busy time is known now.
            outcome = _outcome(assembly, relay.model or model, call_id, relay.busy_s)
            _record(span, outcome, relay.stats.model, self.tracing.capture_content)
            return outcome

    async def _complete_once(self, call: ChatCall, model: str, call_id: str, on_delta: DeltaHook) -> ModelOutcome:
        """For backends that cannot stream while choosing tools: one answer, one delta."""
        body = {k: v for k, v in call.payload.items() if k not in ("stream", "stream_options")}
        call = replace(call, request=ChatCompletionRequest.model_validate(body), payload=body)
        with activate(self._chat.start_span(model, body)) as span:  # the chat service records the reply on it
            completion = await self._chat.complete(call, {}, span=span)
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
