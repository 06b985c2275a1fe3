"""Legacy text completions (`POST /v1/completions`) through the router and the same dispatcher as chat.

They go to the backend's own `/v1/completions`, not through a chat template: a text completion continues the
prompt as it is written, which only the backend's completions endpoint does (vLLM, llama.cpp and the embedded
model's server all have one; a cloud API may not, and says so). Streams are relayed like chat streams, with
usage counted where the backend reports none. Each call is a `text_completion {model}` client span.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import orjson
import structlog

from strata.cost.gpu_time import GpuTimeShares
from strata.observability import tracing_genai as genai
from strata.observability.tracing import Span, SpanKind, Tracing, activate, with_trace_headers
from strata.serving.chat import Completion, relay_for
from strata.serving.client import answer_object
from strata.serving.deployment import COMPLETIONS, Deployment
from strata.serving.dispatch import Dispatcher
from strata.serving.router import Router
from strata.serving.schemas import CompletionRequest
from strata.serving.stream_relay import ChatStreamRelay
from strata.serving.usage import Usage

OPERATION = "text_completion"


class CompletionService:
    def __init__(self, router: Router, tracing: Tracing | None = None, gpu_time: GpuTimeShares | None = None) -> None:
        self._router = router
        self._dispatcher = Dispatcher(router, gpu_time)
        self.tracing = tracing or Tracing.disabled()

    def _model(self, request: CompletionRequest) -> str:
        model = self._router.route(request.model)
        self._router.check_serves(model, COMPLETIONS)
        return model

    def _span(self, request: CompletionRequest) -> Span | None:
        if not self.tracing.enabled:
            return None
        attributes = {genai.OPERATION: OPERATION, genai.REQUEST_MODEL: request.model}
        if request.max_tokens is not None:
            attributes[genai.REQUEST_MAX_TOKENS] = request.max_tokens
        return self.tracing.start_span(f"{OPERATION} {request.model}", kind=SpanKind.CLIENT, attributes=attributes)

    @staticmethod
    def _body(payload: dict[str, Any], *, stream: bool) -> Callable[[Deployment], bytes]:
        if stream:  # always ask for usage (metering needs it); the relay hides it from clients that did not ask
            payload = {**payload, "stream_options": {**(payload.get("stream_options") or {}), "include_usage": True}}

        def for_deployment(deployment: Deployment) -> bytes:
            return orjson.dumps(deployment.adapt_completion({**payload, "model": deployment.upstream_model}))

        return for_deployment

    async def complete(
        self,
        request: CompletionRequest,
        payload: dict[str, Any],
        headers: Mapping[str, str],
        *,
        allowed: frozenset[str] | None = None,
    ) -> Completion:
        structlog.contextvars.bind_contextvars(model=request.model)
        span = self._span(request)
        if span is None:
            return await self._complete(request, payload, headers, allowed, None)
        with activate(span) as own:
            return await self._complete(request, payload, headers, allowed, own)

    async def _complete(
        self,
        request: CompletionRequest,
        payload: dict[str, Any],
        headers: Mapping[str, str],
        allowed: frozenset[str] | None,
        span: Span | None,
    ) -> Completion:
        deployment, reply = await self._dispatcher.complete(
            self._model(request),
            self._body(payload, stream=False),
            COMPLETIONS,
            with_trace_headers(headers, span),
            allowed=allowed,
        )
        answer = answer_object(reply.body, deployment.name, "choices")
        reported = answer.get("usage")
        if isinstance(reported, dict) and all(
            isinstance(reported.get(k), int) for k in ("prompt_tokens", "completion_tokens")
        ):
            usage = Usage(reported["prompt_tokens"], reported["completion_tokens"])
            completion = Completion(reply.body, usage, deployment.model, reply.busy_s)
        else:
            text = "".join(str(c.get("text") or "") for c in answer["choices"] if isinstance(c, dict))
            usage = Usage(await deployment.counter.count(request.prompt_text()), await deployment.counter.count(text))
            answer["usage"] = usage.as_dict()
            completion = Completion(orjson.dumps(answer), usage, deployment.model, reply.busy_s)
        if span is not None and span.is_recording():
            span.set_attributes(_reply_attributes(deployment, usage))
        return completion

    async def open_stream(
        self,
        request: CompletionRequest,
        payload: dict[str, Any],
        headers: Mapping[str, str],
        *,
        allowed: frozenset[str] | None = None,
    ) -> ChatStreamRelay:
        """Errors before the first byte raise here, so the client still gets a proper status code."""
        structlog.contextvars.bind_contextvars(model=request.model)
        span = self._span(request)
        try:
            with activate(span, end=False) if span is not None else nullcontext():
                deployment, stream = await self._dispatcher.open_stream(
                    self._model(request),
                    self._body(payload, stream=True),
                    COMPLETIONS,
                    with_trace_headers(headers, span),
                    allowed=allowed,
                )
        except BaseException:
            if span is not None:
                span.end()
            raise
        relay = relay_for(stream, deployment, request.wants_stream_usage, request.prompt_text(), 0)
        relay.chunk_object = "text_completion"
        if span is not None:
            stream.on_close(lambda: _end_span(span, deployment, relay))
        return relay


def _reply_attributes(deployment: Deployment, usage: Usage | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        genai.PROVIDER: genai.provider_name(deployment.kind),
        genai.DEPLOYMENT: deployment.name,
    }
    if usage is not None:
        attributes |= {genai.INPUT_TOKENS: usage.prompt_tokens, genai.OUTPUT_TOKENS: usage.completion_tokens}
    return attributes


def _end_span(span: Span, deployment: Deployment, relay: ChatStreamRelay) -> None:
    if span.is_recording():
        span.set_attributes(_reply_attributes(deployment, relay.stats.usage))
    span.end()
