"""Chat completions through the router and the dispatcher; makes sure `usage` is always filled.

Each call is a `chat {model}` client span (GenAI conventions) whose trace context goes to the backend as
`traceparent`. A caller that makes the span itself (an agent run's model step) passes it in `span=`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from strata.cost.gpu_time import GpuTimeShares
from strata.observability import tracing_genai as genai
from strata.observability.tracing import Span, SpanKind, Tracing, activate, fail, with_trace_headers
from strata.serving.client import UpstreamStream
from strata.serving.deployment import CHAT, Deployment
from strata.serving.dispatch import Dispatcher, FallbackHook
from strata.serving.errors import ServingError, UpstreamStatusError
from strata.serving.router import Router, RoutingHints
from strata.serving.schemas import ChatCompletionRequest
from strata.serving.stream_relay import ChatStreamRelay, prompt_tokens_estimate
from strata.serving.usage import Usage

CHAT_PATH = CHAT


@dataclass(frozen=True)
class ChatCall:
    """A validated request plus the client's JSON as sent, which is what gets forwarded.

    `agent` and `tag` feed route rules (a request from an agent's run, or tagged by its client). `allowed`: the
    models the caller's key may use (None: any); the model asked for was checked by the caller, a fallback is tried
    only when it is allowed too, so a key's allow-list holds for every model that answers on its behalf."""

    request: ChatCompletionRequest
    payload: dict[str, Any]
    agent: str | None = None
    tag: str | None = None
    allowed: frozenset[str] | None = None
    fallbacks: tuple[str, ...] = ()  # the caller's own, after the model's (an agent's fallback model)
    on_fallback: FallbackHook | None = None  # told when a fallback takes over (an agent run records it)


@dataclass(frozen=True, slots=True)
class Completion:
    """The client's answer as bytes, plus its usage for rate limits and metering."""

    body: bytes
    usage: Usage
    model: str = ""  # the model that answered: the one asked for, or its fallback
    busy_s: float = 0.0  # its share of the deployment's busy time (GPU-hour pricing)


class ChatService:
    def __init__(self, router: Router, tracing: Tracing | None = None, gpu_time: GpuTimeShares | None = None) -> None:
        self._router = router
        self._dispatcher = Dispatcher(router, gpu_time)
        self.tracing = tracing or Tracing.disabled()

    def models(self) -> list[str]:
        """The model and route names this replica serves now (hot swap and reload change them)."""
        return self._router.models

    def streams_tool_calls(self, model: str) -> bool:
        return self._router.resolve(model).streams_tool_calls

    def provider_name(self, model: str) -> str | None:
        """`gen_ai.provider.name` of a model (or route): its deployments' kind; None if it is unknown."""
        try:
            return genai.provider_name(self._router.resolve(model).kind)
        except ServingError:
            return None

    def _model(self, call: ChatCall) -> str:
        requested = call.request.model
        if self._router.is_model(requested):
            model = requested  # the common case: no route, no hints to compute
        else:
            hints = RoutingHints(call.agent, call.tag, len(call.request.prompt_text()) // 4)
            model = self._router.route(requested, hints)
        self._router.check_serves(model, CHAT_PATH)
        return model

    def _body(self, call: ChatCall, *, stream: bool) -> Any:
        payload = dict(call.payload)
        if stream:
            # Always ask for usage (metering needs it); the relay hides it from clients that did not ask.
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}

        def for_deployment(deployment: Deployment) -> bytes:
            payload["model"] = deployment.upstream_model
            return orjson.dumps(deployment.adapt(payload))

        return for_deployment

    def start_span(self, model: str, payload: Mapping[str, Any]) -> Span:
        """A `chat {model}` span for a call about to be made (not current, not ended: the caller's job)."""
        span = self.tracing.start_span(
            f"chat {model}", kind=SpanKind.CLIENT, attributes=genai.chat_request_attributes(model, payload)
        )
        if self.tracing.capture_content and span.is_recording():
            span.set_attributes(genai.input_messages(payload.get("messages") or ()))
        return span

    async def complete(self, call: ChatCall, headers: Mapping[str, str], *, span: Span | None = None) -> Completion:
        structlog.contextvars.bind_contextvars(model=call.request.model)
        if span is not None or not self.tracing.enabled:
            return await self._complete(call, headers, span)
        with activate(self.start_span(call.request.model, call.payload)) as own:
            return await self._complete(call, headers, own)

    async def _complete(self, call: ChatCall, headers: Mapping[str, str], span: Span | None) -> Completion:
        model = self._model(call)
        headers = with_trace_headers(headers, span)
        deployment, reply = await self._dispatcher.complete(
            model, self._body(call, stream=False), CHAT_PATH, headers, allowed=call.allowed,
            fallbacks=call.fallbacks, on_fallback=call.on_fallback,
        )  # fmt: skip
        try:
            body = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            raise UpstreamStatusError(
                "the backend answered with something that is not JSON", status=502, deployment=deployment.name
            ) from None
        if not isinstance(body, dict):
            raise UpstreamStatusError(
                "the backend answered with JSON that is not an object", status=502, deployment=deployment.name
            )
        if not _has_usage(body):
            usage = await self._count(deployment, call, body)
            body["usage"] = usage.as_dict()
            completion = Completion(orjson.dumps(body), usage, deployment.model, reply.busy_s)
        else:
            reported = body["usage"]
            usage = Usage(int(reported["prompt_tokens"]), int(reported["completion_tokens"]))
            completion = Completion(reply.body, usage, deployment.model, reply.busy_s)
        if span is not None and span.is_recording():
            _record_reply(span, deployment, body, completion.usage, self.tracing.capture_content)
        return completion

    async def open_stream(
        self, call: ChatCall, headers: Mapping[str, str], *, span: Span | None = None
    ) -> ChatStreamRelay:
        """Errors before the first byte raise here, so the client still gets a proper status code.

        Without `span=`, the call's own span lasts until the stream closes; with it, ending it is the caller's."""
        structlog.contextvars.bind_contextvars(model=call.request.model)
        own = None
        if span is None and self.tracing.enabled:
            span = own = self.start_span(call.request.model, call.payload)
        body, headers = self._body(call, stream=True), with_trace_headers(headers, span)
        if own is None:
            deployment, stream = await self._dispatcher.open_stream(
                self._model(call), body, CHAT_PATH, headers, allowed=call.allowed, fallbacks=call.fallbacks,
                on_fallback=call.on_fallback,
            )  # fmt: skip
        else:
            try:
                with activate(own, end=False):  # current: retries and fallbacks become its events
                    model = self._model(call)
                    deployment, stream = await self._dispatcher.open_stream(
                        model, body, CHAT_PATH, headers, allowed=call.allowed, fallbacks=call.fallbacks,
                        on_fallback=call.on_fallback,
                    )  # fmt: skip
            except BaseException:
                own.end()
                raise
        request = call.request
        relay = relay_for(stream, deployment, request.wants_stream_usage, request.prompt_text(), len(request.messages))
        if span is not None and span.is_recording():
            span.set_attributes(
                {genai.PROVIDER: genai.provider_name(deployment.kind), genai.DEPLOYMENT: deployment.name}
            )
        if own is not None:
            stream.on_close(lambda: _end_stream_span(own, relay))
        return relay

    async def _count(self, deployment: Deployment, call: ChatCall, body: dict[str, Any]) -> Usage:
        text = []
        for choice in body.get("choices") or ():
            message = choice.get("message") or {}
            text.append(message.get("content") or "")
            for tool_call in message.get("tool_calls") or ():
                function = tool_call.get("function") or {}
                text.append((function.get("name") or "") + (function.get("arguments") or ""))
        request = call.request
        prompt = await prompt_tokens_estimate(request.prompt_text(), len(request.messages), deployment.counter)
        return Usage(prompt, await deployment.counter.count("".join(text)))


def relay_for(
    stream: UpstreamStream, deployment: Deployment, client_wants_usage: bool, prompt: str, messages: int
) -> ChatStreamRelay:
    """The relay of a stream from `deployment`, which counts the usage itself where the backend reports none."""

    async def prompt_tokens() -> int:
        return await prompt_tokens_estimate(prompt, messages, deployment.counter)

    relay = ChatStreamRelay(
        stream,
        client_wants_usage=client_wants_usage,
        backend_reports_usage=deployment.reports_stream_usage,
        prompt_tokens=prompt_tokens,
        counter=deployment.counter,
    )
    relay.model = deployment.model  # a fallback may answer for the model asked for
    return relay


def _has_usage(body: dict[str, Any]) -> bool:
    usage = body.get("usage")
    return (
        isinstance(usage, dict)
        and isinstance(usage.get("prompt_tokens"), int)
        and isinstance(usage.get("completion_tokens"), int)
    )


def _record_reply(span: Span, deployment: Deployment, body: dict[str, Any], usage: Usage, content: bool) -> None:
    """What a non-streamed answer tells its `chat` span: backend, model, usage, finish reasons (and content)."""
    choices = [c for c in body.get("choices") or () if isinstance(c, dict)]
    reasons = [str(c.get("finish_reason") or "") for c in choices]
    attributes: dict[str, Any] = {
        genai.PROVIDER: genai.provider_name(deployment.kind),
        genai.DEPLOYMENT: deployment.name,
        genai.INPUT_TOKENS: usage.prompt_tokens,
        genai.OUTPUT_TOKENS: usage.completion_tokens,
        genai.FINISH_REASONS: reasons,
    }
    if isinstance(body.get("model"), str):
        attributes[genai.RESPONSE_MODEL] = body["model"]
    if isinstance(body.get("id"), str):
        attributes[genai.RESPONSE_ID] = body["id"]
    if content:
        messages = [c.get("message") or {} for c in choices]
        attributes[genai.OUTPUT_MESSAGES] = genai.output_messages(messages, reasons)
    span.set_attributes(attributes)


def _end_stream_span(span: Span, relay: ChatStreamRelay) -> None:
    """When a relayed stream closes: why each choice ended, its usage, or the failure of a stream that ended early."""
    stats = relay.stats
    if span.is_recording():
        if stats.model:
            span.set_attribute(genai.RESPONSE_MODEL, stats.model)
        if stats.chunk_id and stats.chunk_id != "chatcmpl-strata":
            span.set_attribute(genai.RESPONSE_ID, stats.chunk_id)
        if stats.finish_reasons:
            span.set_attribute(genai.FINISH_REASONS, [stats.finish_reasons[i] for i in sorted(stats.finish_reasons)])
        if stats.usage is not None:
            span.set_attributes(
                {genai.INPUT_TOKENS: stats.usage.prompt_tokens, genai.OUTPUT_TOKENS: stats.usage.completion_tokens}
            )
        else:  # cut off: the backend failed mid-stream, or the client went away
            fail(span, error_type="stream_incomplete", message="the stream ended before it was complete")
    span.end()
