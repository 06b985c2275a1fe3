"""Embeddings through the router and the same dispatcher as chat (retries, breakers, fallbacks, admission).

The request goes to the backend as the client sent it, with the deployment's model name; the answer comes back
as the backend wrote it, with `usage` filled in where the backend left it out (metering and token limits need it).
Each call is an `embeddings {model}` client span (GenAI conventions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import structlog

from strata.cost.gpu_time import GpuTimeShares
from strata.observability import tracing_genai as genai
from strata.observability.tracing import Span, SpanKind, Tracing, activate, with_trace_headers
from strata.serving.chat import Completion
from strata.serving.client import answer_object
from strata.serving.deployment import EMBEDDINGS, Deployment
from strata.serving.dispatch import Dispatcher
from strata.serving.router import Router
from strata.serving.schemas import EmbeddingRequest
from strata.serving.usage import Usage

OPERATION = "embeddings"


class EmbeddingService:
    def __init__(self, router: Router, tracing: Tracing | None = None, gpu_time: GpuTimeShares | None = None) -> None:
        self._router = router
        self._dispatcher = Dispatcher(router, gpu_time)
        self.tracing = tracing or Tracing.disabled()

    async def create(
        self,
        request: EmbeddingRequest,
        payload: dict[str, Any],
        headers: Mapping[str, str],
        *,
        allowed: frozenset[str] | None = None,
    ) -> Completion:
        """`payload`: the client's JSON as sent; `allowed`: the models the caller's key may use (None: any)."""
        structlog.contextvars.bind_contextvars(model=request.model)
        if not self.tracing.enabled:
            return await self._create(request, payload, headers, allowed, None)
        attributes = {genai.OPERATION: OPERATION, genai.REQUEST_MODEL: request.model}
        span = self.tracing.start_span(f"{OPERATION} {request.model}", kind=SpanKind.CLIENT, attributes=attributes)
        with activate(span) as own:
            return await self._create(request, payload, headers, allowed, own)

    async def _create(
        self,
        request: EmbeddingRequest,
        payload: dict[str, Any],
        headers: Mapping[str, str],
        allowed: frozenset[str] | None,
        span: Span | None,
    ) -> Completion:
        model = self._router.route(request.model)
        self._router.check_serves(model, EMBEDDINGS)

        def body(deployment: Deployment) -> bytes:
            return orjson.dumps({**payload, "model": deployment.upstream_model})

        deployment, reply = await self._dispatcher.complete(
            model, body, EMBEDDINGS, with_trace_headers(headers, span), allowed=allowed
        )
        answer = answer_object(reply.body, deployment.name, "data")
        reported = answer.get("usage")
        if isinstance(reported, dict) and isinstance(reported.get("prompt_tokens"), int):
            usage = Usage(reported["prompt_tokens"], 0)
            completion = Completion(reply.body, usage, deployment.model, reply.busy_s)
        else:  # some servers leave usage out: count the inputs
            counted = sum([await deployment.counter.count(text) for text in request.texts()])
            usage = Usage(counted + request.token_count(), 0)
            answer["usage"] = {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}
            completion = Completion(orjson.dumps(answer), usage, deployment.model, reply.busy_s)
        if span is not None and span.is_recording():
            span.set_attributes(
                {
                    genai.PROVIDER: genai.provider_name(deployment.kind),
                    genai.DEPLOYMENT: deployment.name,
                    genai.INPUT_TOKENS: usage.prompt_tokens,
                }
            )
        return completion
