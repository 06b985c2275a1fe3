"""Attribute names of the OpenTelemetry GenAI semantic conventions (and Strata's own), and the helpers
that fill them. Kept here as constants: the conventions are still in development, and the semconv
package has moved its GenAI names out, so one file says exactly what Strata emits.

Content (prompts, answers, tool arguments and results) is only ever recorded when
`tracing.capture_content` is on; the helpers below that build it are never called otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

# -- GenAI semantic conventions ---------------------------------------------------------------------
OPERATION = "gen_ai.operation.name"  # "chat", "invoke_agent", "execute_tool"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
CONVERSATION_ID = "gen_ai.conversation.id"
AGENT_NAME = "gen_ai.agent.name"
AGENT_VERSION = "gen_ai.agent.version"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"
TOOL_TYPE = "gen_ai.tool.type"  # "function", "extension" (an MCP server's tool), "datastore"
# Content, only with tracing.capture_content:
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_RESULT = "gen_ai.tool.call.result"
ERROR_TYPE = "error.type"

CHAT = "chat"
INVOKE_AGENT = "invoke_agent"
EXECUTE_TOOL = "execute_tool"

# -- Strata's own -----------------------------------------------------------------------------------
RUN_ID = "strata.run.id"
OWNER = "strata.owner"  # the user the work is done for: who may read the span from the local store
KEY_ID = "strata.key_id"
REQUEST_ID = "strata.request_id"
DEPLOYMENT = "strata.deployment"  # "<model>/<host:port>": the backend that answered
RUN_ATTEMPT = "strata.run.attempt"
RUN_STATUS = "strata.run.status"
CANCELLED = "strata.cancelled"

# Span events (retries, fallbacks, breaker trips, queue waits): names and attribute keys.
EVENT_RETRY = "strata.retry"
EVENT_FALLBACK = "strata.fallback"
EVENT_BREAKER_OPEN = "strata.breaker_open"  # a deployment was skipped: its breaker refuses requests
EVENT_BREAKER_TRIPPED = "strata.breaker_tripped"  # this failure opened a deployment's breaker
EVENT_QUEUE_WAIT = "strata.queue_wait"  # admission control queued the request before it went upstream
EVENT_OVERLOADED = "strata.overloaded"  # admission control refused it on a deployment
EVENT_RUN_WAITING = "strata.run.waiting"  # a run waits out backpressure before its next model call
EVENT_RUN_RETRY = "strata.run.retry"
EVENT_RUN_FALLBACK = "strata.run.fallback"

# Attributes copied from a span to every span started under it in this process (a run's id, its owner,
# its conversation), so the local store can find a run's spans and check who may read them.
INHERITED = (RUN_ID, OWNER, CONVERSATION_ID)

MAX_CONTENT_CHARS = 64 * 1024  # one content attribute; longer ones are cut (and say so)

_PROVIDERS = {"embedded": "llama.cpp", "vllm": "vllm", "openai": "openai"}


def provider_name(deployment_kind: str) -> str:
    """`gen_ai.provider.name` of a deployment kind. Remote backends speak OpenAI's API: "openai"."""
    return _PROVIDERS.get(deployment_kind, deployment_kind)


def error_type(exc: BaseException) -> str:
    """`error.type`: an HTTP status for upstream answers, else the error's code, else its class."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status >= 400:
        return str(status)
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    return type(exc).__qualname__


def chat_request_attributes(model: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of a `chat {model}` span known before the call: no content."""
    attributes: dict[str, Any] = {OPERATION: CHAT, REQUEST_MODEL: model}
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if isinstance(max_tokens, int):
        attributes[REQUEST_MAX_TOKENS] = max_tokens
    temperature = payload.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        attributes[REQUEST_TEMPERATURE] = float(temperature)
    top_p = payload.get("top_p")
    if isinstance(top_p, int | float) and not isinstance(top_p, bool):
        attributes[REQUEST_TOP_P] = float(top_p)
    return attributes


def clip(text: str) -> str:
    if len(text) <= MAX_CONTENT_CHARS:
        return text
    return text[:MAX_CONTENT_CHARS] + f"... [{len(text) - MAX_CONTENT_CHARS} more characters]"


def input_messages(messages: Iterable[Any]) -> dict[str, str]:
    """`gen_ai.system_instructions` and `gen_ai.input.messages` (JSON) from OpenAI-style messages."""
    system: list[dict[str, Any]] = []
    chat: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        if message.get("role") in ("system", "developer"):
            system.extend(_text_parts(message.get("content")))
            continue
        chat.append({"role": message.get("role"), "parts": _parts(message)})
    attributes = {INPUT_MESSAGES: clip(orjson.dumps(chat).decode())}
    if system:
        attributes[SYSTEM_INSTRUCTIONS] = clip(orjson.dumps(system).decode())
    return attributes


def output_messages(messages: Iterable[Mapping[str, Any]], finish_reasons: Iterable[str | None]) -> str:
    """`gen_ai.output.messages` (JSON) from assistant messages and their finish reasons."""
    out = [
        {"role": message.get("role") or "assistant", "parts": _parts(message), "finish_reason": reason or ""}
        for message, reason in zip(messages, finish_reasons, strict=False)
    ]
    return clip(orjson.dumps(out).decode())


def content_text(value: Any) -> str:
    """Tool arguments or results as one string attribute."""
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return clip(text)


def _parts(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    if message.get("role") == "tool":
        return [{"type": "tool_call_response", "id": message.get("tool_call_id"), "response": message.get("content")}]
    parts = _text_parts(message.get("content"))
    for call in message.get("tool_calls") or ():
        if not isinstance(call, Mapping):
            continue
        function = call.get("function") or {}
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": function.get("name"),
                "arguments": function.get("arguments"),
            }
        )
    return parts


def _text_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}] if content else []
    parts = []
    for part in content or ():  # OpenAI content parts: [{"type": "text", "text": ...}, {"type": "image_url"...}]
        if isinstance(part, Mapping) and part.get("type") == "text":
            parts.append({"type": "text", "content": part.get("text")})
        elif isinstance(part, Mapping):
            parts.append({"type": str(part.get("type") or "unknown")})
    return parts
