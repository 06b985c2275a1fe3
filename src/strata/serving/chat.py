"""Chat completions through the router: pick the deployment, call it, make sure `usage` is filled."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from strata.serving.deployment import Deployment
from strata.serving.router import Router
from strata.serving.schemas import ChatCompletionRequest
from strata.serving.stream_relay import ChatStreamRelay, prompt_tokens_estimate
from strata.serving.usage import Usage

CHAT_PATH = "/chat/completions"


@dataclass(frozen=True)
class ChatCall:
    """A validated request plus the client's JSON as sent, which is what gets forwarded."""

    request: ChatCompletionRequest
    payload: dict[str, Any]


class ChatService:
    def __init__(self, router: Router) -> None:
        self._router = router

    def streams_tool_calls(self, model: str) -> bool:
        return self._router.resolve(model).streams_tool_calls

    def _target(self, call: ChatCall) -> tuple[Deployment, dict[str, Any]]:
        deployment = self._router.resolve(call.request.model)
        deployment.check_available()
        payload = call.payload
        payload["model"] = deployment.upstream_model
        return deployment, payload

    async def complete(self, call: ChatCall, headers: Mapping[str, str]) -> bytes:
        deployment, payload = self._target(call)
        reply = await deployment.client.post_json(CHAT_PATH, orjson.dumps(payload), headers)
        body = orjson.loads(reply.body)
        if isinstance(body, dict) and not _has_usage(body):
            body["usage"] = (await self._count(deployment, call, body)).as_dict()
            return orjson.dumps(body)
        return reply.body

    async def open_stream(self, call: ChatCall, headers: Mapping[str, str]) -> ChatStreamRelay:
        """Errors before the first byte raise here, so the client still gets a proper status code."""
        deployment, payload = self._target(call)
        # Always ask for usage (metering needs it); the relay hides it from clients that did not ask.
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        stream = await deployment.client.open_stream(CHAT_PATH, orjson.dumps(payload), headers)
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
    return isinstance(usage, dict) and "prompt_tokens" in usage and "completion_tokens" in usage
