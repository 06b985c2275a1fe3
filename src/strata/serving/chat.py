"""Chat completions through the router and the dispatcher; makes sure `usage` is always filled."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from strata.serving.deployment import Deployment
from strata.serving.dispatch import Dispatcher
from strata.serving.errors import UpstreamStatusError
from strata.serving.router import Router, RoutingHints
from strata.serving.schemas import ChatCompletionRequest
from strata.serving.stream_relay import ChatStreamRelay, prompt_tokens_estimate
from strata.serving.usage import Usage

CHAT_PATH = "/chat/completions"


@dataclass(frozen=True)
class ChatCall:
    """A validated request plus the client's JSON as sent, which is what gets forwarded.

    `agent` and `tag` feed route rules (a request from an agent's run, or tagged by its client)."""

    request: ChatCompletionRequest
    payload: dict[str, Any]
    agent: str | None = None
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """The client's answer as bytes, plus its usage for rate limits and metering."""

    body: bytes
    usage: Usage


class ChatService:
    def __init__(self, router: Router) -> None:
        self._router = router
        self._dispatcher = Dispatcher(router)

    def streams_tool_calls(self, model: str) -> bool:
        return self._router.resolve(model).streams_tool_calls

    def _model(self, call: ChatCall) -> str:
        requested = call.request.model
        if self._router.is_model(requested):
            return requested  # the common case: no route, no hints to compute
        hints = RoutingHints(call.agent, call.tag, len(call.request.prompt_text()) // 4)
        return self._router.route(requested, hints)

    def _body(self, call: ChatCall, *, stream: bool) -> Any:
        payload = dict(call.payload)
        if stream:
            # Always ask for usage (metering needs it); the relay hides it from clients that did not ask.
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}

        def for_deployment(deployment: Deployment) -> bytes:
            payload["model"] = deployment.upstream_model
            return orjson.dumps(deployment.adapt(payload))

        return for_deployment

    async def complete(self, call: ChatCall, headers: Mapping[str, str]) -> Completion:
        model = self._model(call)
        deployment, reply = await self._dispatcher.complete(model, self._body(call, stream=False), CHAT_PATH, headers)
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
            return Completion(orjson.dumps(body), usage)
        reported = body["usage"]
        return Completion(reply.body, Usage(int(reported["prompt_tokens"]), int(reported["completion_tokens"])))

    async def open_stream(self, call: ChatCall, headers: Mapping[str, str]) -> ChatStreamRelay:
        """Errors before the first byte raise here, so the client still gets a proper status code."""
        model = self._model(call)
        deployment, stream = await self._dispatcher.open_stream(
            model, self._body(call, stream=True), CHAT_PATH, headers
        )
        request = call.request

        async def prompt_tokens() -> int:
            return await prompt_tokens_estimate(request.prompt_text(), len(request.messages), deployment.counter)

        return ChatStreamRelay(
            stream,
            client_wants_usage=request.wants_stream_usage,
            backend_reports_usage=deployment.reports_stream_usage,
            prompt_tokens=prompt_tokens,
            counter=deployment.counter,
        )

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


def _has_usage(body: dict[str, Any]) -> bool:
    usage = body.get("usage")
    return (
        isinstance(usage, dict)
        and isinstance(usage.get("prompt_tokens"), int)
        and isinstance(usage.get("completion_tokens"), int)
    )
