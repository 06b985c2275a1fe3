"""The OpenAI Responses API over chat completions: a request becomes a chat payload, a chat answer (or its
stream of chunks) becomes a response object (or the Responses API's typed stream events).

Pure: no I/O and no state beyond one stream's, so each mapping is unit-tested on its own. What the chat
backends cannot do (built-in tools, reasoning controls, server-side conversations...) is refused with a 400
that names the field: never silently dropped.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from strata.api.errors import ApiError, invalid_body
from strata.serving.usage import Usage

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Known Responses fields Strata does not implement: each gets its own reason instead of "extra field".
UNSUPPORTED = {
    "conversation": "server-side conversations are not supported; use previous_response_id",
    "prompt": "stored prompt templates are not supported; send 'instructions' and 'input'",
    "max_tool_calls": "is not supported; limit tool calls in the client",
    "top_logprobs": "is not supported by Strata's chat backends",
    "prompt_cache_retention": "is not supported",
    "prompt_cache_options": "is not supported",
    "context_management": "is not supported",
}


class ResponsesRequest(BaseModel):
    """`POST /v1/responses`, as far as Strata implements it; any other field is refused (extra="forbid")."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, max_length=64)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=512)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    store: bool = True
    background: bool = False
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16
    )
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    service_tier: Literal["auto", "default"] | None = None
    truncation: Literal["disabled"] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_or_items(cls, value: Any) -> Any:
        if isinstance(value, list):
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ValueError(f"item {index} must be an object (a message or another input item)")
        elif not isinstance(value, str):
            raise ValueError("must be text or a list of input items")
        return value


def parse_request(payload: Any) -> ResponsesRequest:
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, reason in UNSUPPORTED.items():
        if payload.get(name) is not None:
            raise ApiError(400, f"{name}: {reason}", param=name, code="unsupported_parameter")
    try:
        request = ResponsesRequest.model_validate(payload)
    except ValidationError as exc:
        raise invalid_body(exc.errors(include_url=False)) from None
    if request.reasoning and any(v is not None for v in request.reasoning.values()):
        raise _unsupported("reasoning", "reasoning controls are not supported by Strata's chat backends")
    if request.include:
        raise _unsupported("include", f"{request.include[0]!r} cannot be included: Strata has nothing extra to add")
    if request.background and request.stream:
        raise ApiError(400, "background: a background response cannot be streamed; poll it", param="background")
    if request.background and not request.store:
        raise ApiError(400, "background: a background response must be stored (store: true)", param="background")
    if request.stream_options and set(request.stream_options) - {"include_obfuscation"}:
        raise _unsupported("stream_options", "only 'include_obfuscation' is accepted")
    return request


def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


# -- request -> chat -----------------------------------------------------------------------------------------


def input_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's `input` as chat messages (without `instructions`: a follow-up does not inherit those)."""
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(request.input):
        where = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = {
                "id": _text_field(item, "call_id", where),
                "type": "function",
                "function": {
                    "name": _text_field(item, "name", where),
                    "arguments": _text_field(item, "arguments", where),
                },
            }
            if messages and messages[-1]["role"] == "assistant":  # its text, or parallel calls: one turn
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _parts_text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _text_field(item, "call_id", where), "content": content})
        else:
            raise _unsupported(
                f"{where}.type",
                f"input items of type {kind!r} are not supported "
                "(supported: message, function_call, function_call_output)",
            )
    return messages


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise ApiError(
            400, f"{where}.role: must be user, system, developer or assistant, not {role!r}", param=f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content: must be a string or a list of content parts", param=f"{where}.content")
    if role == "user" and any(isinstance(p, dict) and p.get("type") == "input_image" for p in content):
        return {"role": role, "content": [_image_or_text(p, f"{where}.content[{i}]") for i, p in enumerate(content)]}
    return {"role": role, "content": _parts_text(content, f"{where}.content")}


def _parts_text(parts: Any, where: str) -> str:
    if not isinstance(parts, list):
        raise ApiError(400, f"{where}: must be a string or a list of content parts", param=where)
    texts = []
    for index, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise _unsupported(
                f"{where}[{index}].type",
                f"content parts of type {kind!r} are not supported here "
                "(supported: input_text, output_text, and input_image in user messages)",
            )
    return "".join(texts)


def _image_or_text(part: Any, where: str) -> dict[str, Any]:
    if isinstance(part, dict) and part.get("type") == "input_image":
        if not isinstance(part.get("image_url"), str):
            raise _unsupported(f"{where}.image_url", "an image needs an 'image_url' (file_id is not supported)")
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail") or "auto"}}
    return {"type": "text", "text": _parts_text([part], where)}


def _text_field(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{where}.{name}: required, a string", param=f"{where}.{name}")
    return value


def chat_payload(request: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat-completions request that answers `request` after the conversation so far (`history`)."""
    messages = [{"role": "system", "content": request.instructions}] if request.instructions else []
    payload: dict[str, Any] = {"model": request.model, "messages": messages + history + input_messages(request)}
    if request.tools:
        payload["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(request.tools)]
    if request.tool_choice is not None:
        payload["tool_choice"] = _tool_choice(request.tool_choice)
    if request.parallel_tool_calls is False:
        payload["parallel_tool_calls"] = False
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if (value := getattr(request, ours)) is not None:
            payload[theirs] = value
    if request.text is not None:
        payload.update(_text_format(request.text))
    if request.stream:
        payload["stream"] = True
    return payload


def _tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    kind = tool.get("type")
    if kind != "function":
        raise _unsupported(
            f"{where}.type",
            f"tools of type {kind!r} are not supported; Strata's models call "
            "'function' tools (give agents built-in tools through a Strata agent: model 'agent:<name>')",
        )
    function = {"name": _text_field(tool, "name", where)}
    if not _TOOL_NAME.fullmatch(function["name"]):
        raise ApiError(
            400,
            f"{where}.name: {function['name']!r} is not a function name (letters, digits, _ and -, up to 64)",
            param=f"{where}.name",
        )
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _unsupported(
        "tool_choice",
        f"tool_choice of type {choice.get('type')!r} is not supported "
        "(supported: none, auto, required, or {'type': 'function', 'name': ...})",
    )


def _text_format(text: dict[str, Any]) -> dict[str, Any]:
    if set(text) - {"format"}:
        raise _unsupported(f"text.{sorted(set(text) - {'format'})[0]}", "is not supported (only text.format)")
    fmt = text.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        if not isinstance(schema.get("schema"), dict):
            raise ApiError(400, "text.format.schema: required, a JSON schema object", param="text.format.schema")
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise _unsupported("text.format.type", f"{kind!r} is not a supported format (text, json_object, json_schema)")


# -- chat -> response ----------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_view(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def response_object(
    request: ResponsesRequest,
    *,
    response_id: str,
    created_at: float,
    status: str,
    output: list[dict[str, Any]] | None = None,
    usage: Usage | None = None,
    error: dict[str, Any] | None = None,
    incomplete: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The response object, echoing the request's settings as OpenAI does."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "background": request.background,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": request.model,
        "output": output or [],
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "reasoning": None,
        "service_tier": request.service_tier or "default",
        "store": request.store,
        "temperature": request.temperature,
        "text": request.text or {"format": {"type": "text"}},
        "tool_choice": request.tool_choice or "auto",
        "tools": request.tools or [],
        "top_p": request.top_p,
        "truncation": "disabled",
        "usage": usage_view(usage),
        "user": request.user,
        "metadata": request.metadata or {},
        "completed_at": int(time.time()) if status == "completed" else None,
    }


def ending(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """A chat finish reason as a response's status and `incomplete_details`."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id or new_id("msg"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else [],
    }


def call_item(
    call_id: str, name: str, arguments: str, status: str = "completed", item_id: str | None = None
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id or new_id("fc"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat answer's message as output items: its text (if any, or if it called nothing), then its calls."""
    calls = [c for c in message.get("tool_calls") or () if isinstance(c, dict)]
    content = message.get("content")
    items = [message_item(content if isinstance(content, str) else "")] if content or not calls else []
    for call in calls:
        function = call.get("function") or {}
        items.append(
            call_item(
                str(call.get("id") or new_id("call")),
                str(function.get("name") or ""),
                str(function.get("arguments") or ""),
            )
        )
    return items


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """Output items as the chat message a follow-up request (previous_response_id) sends back."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    message: dict[str, Any] = {"role": "assistant", "content": text}
    calls = [
        {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
        for item in output
        if item["type"] == "function_call"
    ]
    if calls:
        message["tool_calls"] = calls
    return message


def from_completion(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """A chat completion's first choice: its output items and finish reason."""
    choices = body.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    return output_items(choice.get("message") or {}), choice.get("finish_reason")


# -- chat chunks -> stream events ----------------------------------------------------------------------------


@dataclass
class _Call:
    item: dict[str, Any]
    output_index: int


@dataclass
class ResponseStream:
    """The typed events of one streamed response, in the order OpenAI sends them, from chat chunks.

    `start()` opens it, `feed()` takes each chunk, `finish()` or `fail()` closes it. `snapshot` is the response
    object as the events have built it so far."""

    snapshot: dict[str, Any]
    _seq: int = 0
    _output: list[dict[str, Any]] = field(default_factory=list)
    _text: list[str] | None = None  # the open message item's text so far
    _message: dict[str, Any] | None = None
    _calls: dict[int, _Call] = field(default_factory=dict)  # by the chunk's tool-call index
    finish_reason: str | None = None

    def _event(self, kind: str, **data: Any) -> bytes:
        self._seq += 1
        body = orjson.dumps({"type": kind, "sequence_number": self._seq - 1, **data})
        return f"event: {kind}\n".encode() + b"data: " + body + b"\n\n"

    def start(self) -> list[bytes]:
        return [
            self._event("response.created", response=self.snapshot),
            self._event("response.in_progress", response=self.snapshot),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # the Responses API has one answer
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                events += self.text_delta(delta["content"])
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    events += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def text_delta(self, text: str) -> list[bytes]:
        events = []
        if self._message is None:
            self._message = message_item("", status="in_progress")
            self._text = []
            index = self._add(self._message)
            events.append(self._event("response.output_item.added", output_index=index, item=self._message))
            part = {"type": "output_text", "text": "", "annotations": []}
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=self._message["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        assert self._text is not None
        self._text.append(text)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self._message["id"],
                output_index=self._output.index(self._message),
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _call_delta(self, delta: dict[str, Any]) -> list[bytes]:
        events = []
        index = delta.get("index", 0)
        function = delta.get("function") or {}
        call = self._calls.get(index)
        if call is None:
            item = call_item(
                str(delta.get("id") or new_id("call")), str(function.get("name") or ""), "", status="in_progress"
            )
            call = self._calls[index] = _Call(item, self._add(item))
            events.append(self._event("response.output_item.added", output_index=call.output_index, item=dict(item)))
        elif not call.item["name"] and function.get("name"):
            call.item["name"] = function["name"]  # some backends repeat the name in every chunk: keep the first
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            call.item["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=call.item["id"],
                    output_index=call.output_index,
                    delta=arguments,
                )
            )
        return events

    def _add(self, item: dict[str, Any]) -> int:
        self._output.append(item)
        return len(self._output) - 1

    def _close_items(self) -> list[bytes]:
        events = []
        if not self._output:
            events += self.text_delta("")  # an empty answer is still one message
        for index, item in enumerate(self._output):
            if item is self._message:
                text = "".join(self._text or ())
                part = {"type": "output_text", "text": text, "annotations": []}
                events.append(
                    self._event(
                        "response.output_text.done",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        text=text,
                        logprobs=[],
                    )
                )
                events.append(
                    self._event(
                        "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
                    )
                )
                item.update(status="completed", content=[part])
            else:
                events.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                )
                item["status"] = "completed"
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        return events

    @property
    def output(self) -> list[dict[str, Any]]:
        return self._output

    def finish(
        self,
        usage: Usage | None,
        *,
        status: str | None = None,
        incomplete: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> list[bytes]:
        """Close the open items and end the response: as the chat's finish reason says, or with `status`."""
        events = self._close_items() if status != "failed" else []
        if status is None:
            status, incomplete = ending(self.finish_reason)
        self.snapshot.update(
            status=status,
            incomplete_details=incomplete,
            error=error,
            output=self._output,
            usage=usage_view(usage),
            completed_at=int(time.time()) if status == "completed" else None,
        )
        return [*events, self._event(_FINAL_EVENT.get(status, "response.completed"), response=self.snapshot)]

    def fail(self, code: str, message: str, usage: Usage | None = None) -> list[bytes]:
        return self.finish(usage, status="failed", error={"code": code, "message": message})


_FINAL_EVENT = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.failed",
}
