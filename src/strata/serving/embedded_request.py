"""The OpenAI chat request in the form the embedded model's server (llama-cpp-python 0.3) accepts.

What mainstream clients send (the openai SDK's own tool-call round trip, the Agents SDK, LangChain) and that
server refuses or ignores:

- an assistant message with `tool_calls` and `content: null` (its schema wants a string), role `developer`,
  content as a list of text parts outside user messages: refused with a 500 listing validation errors;
- `max_completion_tokens`: ignored, so generation ran on to the context size;
- `response_format` of type `json_schema`: refused; it takes `json_object` with a `schema`;
- a tool without `parameters`: refused;
- `n` > 1: ignored (one choice came back): refused here with a 400 naming `n`;
- the deprecated `functions` / `function_call`: refused with a 400 naming them and saying what to send instead
  (Strata's chat handling speaks tools only; an OpenAI-compatible backend gets them as they are).

Parts other than text (images, audio, files) are refused with a 400 naming the part: the model reads text only.
"""

from __future__ import annotations

from typing import Any

from strata.serving.errors import RequestNotSupportedError

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def adapt(payload: dict[str, Any], deployment: str | None = None) -> dict[str, Any]:
    """A copy of `payload` that the server takes and means the same; the caller's payload is left as it is."""
    adapted = _one_choice(payload, deployment)
    for legacy, instead in (("functions", "tools"), ("function_call", "tool_choice")):
        if legacy in adapted:
            raise RequestNotSupportedError(
                f"{legacy}: the embedded model takes '{instead}' (OpenAI's replacement for the deprecated "
                f"'{legacy}'); send {instead} instead",
                param=legacy,
                deployment=deployment,
            )
    adapted["messages"] = [_message(m, i, deployment) for i, m in enumerate(payload.get("messages") or ())]
    limit = adapted.pop("max_completion_tokens", None)
    if limit is not None:
        current = adapted.get("max_tokens")
        adapted["max_tokens"] = limit if current is None else min(limit, current)
    response_format = adapted.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        adapted["response_format"] = {"type": "json_object", **({"schema": schema} if schema else {})}
    if adapted.get("tools"):
        adapted["tools"] = [_tool(tool) for tool in adapted["tools"]]
    return adapted


def adapt_completion(payload: dict[str, Any], deployment: str | None = None) -> dict[str, Any]:
    """A legacy text-completion request as the server takes it: one text prompt, one choice; what it would get
    wrong (a list of prompts: an assertion error; `logprobs`: needs a model loaded for it) is refused, naming it."""
    adapted = _one_choice(payload, deployment)
    for name, why in (
        ("suffix", "the embedded model does not fill in the middle"),
        ("logprobs", "the embedded model does not return log probabilities"),
    ):
        if adapted.get(name) is not None:
            raise RequestNotSupportedError(f"{name}: {why}; leave {name} out", param=name, deployment=deployment)
    best_of = adapted.pop("best_of", None)
    if best_of is not None and best_of != 1:
        raise RequestNotSupportedError(
            f"best_of: the embedded model makes one completion per request, not {best_of}",
            param="best_of",
            deployment=deployment,
        )
    prompt = adapted.get("prompt")
    if isinstance(prompt, list):
        if not all(isinstance(item, str) for item in prompt):
            raise RequestNotSupportedError(
                "prompt: the embedded model takes text, not token ids", param="prompt", deployment=deployment
            )
        if len(prompt) != 1:
            raise RequestNotSupportedError(
                f"prompt: the embedded model completes one prompt per request, not {len(prompt)}; "
                f"send {len(prompt)} requests instead",
                param="prompt",
                deployment=deployment,
            )
        adapted["prompt"] = prompt[0]
    return adapted


def _one_choice(payload: dict[str, Any], deployment: str | None) -> dict[str, Any]:
    """A copy without `n`, which the server ignores (one choice came back): refused unless it is 1."""
    adapted = dict(payload)
    n = adapted.pop("n", None)
    if n is not None and n != 1:
        raise RequestNotSupportedError(
            f"n: the embedded model answers one choice per request, not {n}; send {n} requests instead",
            param="n",
            deployment=deployment,
        )
    return adapted


def _message(message: dict[str, Any], index: int, deployment: str | None) -> dict[str, Any]:
    role, content = message.get("role"), message.get("content")
    if role != "developer" and isinstance(content, str):
        return message
    adapted = dict(message)
    if role == "developer":  # OpenAI's newer name for the system role
        adapted["role"] = "system"
    if content is None:
        adapted["content"] = ""
    elif isinstance(content, list):
        adapted["content"] = "\n".join(_part_text(part, index, j, deployment) for j, part in enumerate(content))
    return adapted


def _part_text(part: object, index: int, position: int, deployment: str | None) -> str:
    if isinstance(part, dict) and part.get("type") == "text":
        return str(part.get("text") or "")
    if isinstance(part, dict) and part.get("type") == "refusal":  # an assistant turn's refusal, as OpenAI wrote it
        return str(part.get("refusal") or "")
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    param = f"messages[{index}].content[{position}]"
    raise RequestNotSupportedError(
        f"{param}: the embedded model reads text only, not {kind!r} parts", param=param, deployment=deployment
    )


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    if not isinstance(function, dict) or function.get("parameters") is not None:
        return tool
    return {**tool, "function": {**function, "parameters": EMPTY_PARAMETERS}}
