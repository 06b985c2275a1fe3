"""The OpenAI chat-completions request, validated at the edge and passed to serving as a typed object.

Unknown fields are allowed and forwarded untouched: backends grow parameters faster than we could
list them (vLLM's `guided_json`, llama.cpp's `grammar`, ...), and refusing them would break clients.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

_Open = ConfigDict(extra="allow")


class FunctionDefinition(BaseModel):
    model_config = _Open
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = _Open
    type: Literal["function"]
    function: FunctionDefinition


class ToolCallFunction(BaseModel):
    model_config = _Open
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = _Open
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = _Open
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _role_rules(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs 'tool_call_id'")
        if self.role in ("system", "developer", "user") and self.content is None:
            raise ValueError(f"a message with role {self.role!r} needs 'content'")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        return self

    def text(self) -> str:
        """The message's text, for token counting when a backend reports no usage."""
        parts: list[str] = [self.role]
        if isinstance(self.content, str):
            parts.append(self.content)
        elif self.content:
            parts.extend(str(p.get("text", "")) for p in self.content if isinstance(p, dict))
        for call in self.tool_calls or ():
            parts.extend((call.function.name, call.function.arguments))
        return "\n".join(parts)


class NamedFunction(BaseModel):
    model_config = _Open
    name: str


class NamedToolChoice(BaseModel):
    model_config = _Open
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = _Open
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = _Open
    type: Literal["text", "json_object", "json_schema"]


class _Generation(BaseModel):
    """What chat and legacy text completions share: the model, streaming and the sampling parameters."""

    model_config = _Open
    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    user: str | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return value

    @property
    def wants_stream_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    """OpenAI's legacy text-completion request (`POST /v1/completions`)."""

    prompt: str | list[Any]
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=20)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: object) -> object:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("give a string or a non-empty list of strings (or of token ids)")
        if len(value) > MAX_INPUTS:
            raise ValueError(f"{len(value)} prompts, more than the {MAX_INPUTS} one request may have")
        return _text_or_tokens(value, "prompt")

    def prompt_text(self) -> str:
        """The prompts' text, for counting tokens when the backend reports no usage."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        return "\n".join(p for p in prompts if isinstance(p, str))


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=512)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, NamedToolChoice):
            names = {t.function.name for t in info.data.get("tools") or ()}
            if value.function.name not in names:
                raise ValueError(f"names function {value.function.name!r}, which is not among 'tools'")
        return value

    def prompt_text(self) -> str:
        return "\n".join(message.text() for message in self.messages)


MAX_INPUTS = 2048  # OpenAI's limit of inputs (embeddings) or prompts (completions) per request


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request. Token ids are passed on: an OpenAI-compatible backend may take them (the
    embedded model refuses them, naming `input`)."""

    model_config = _Open
    model: str = Field(min_length=1, max_length=256)
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _inputs(cls, value: object) -> object:
        """One message per mistake, in OpenAI's terms (pydantic's union errors name its own types)."""
        if isinstance(value, str):
            if not value:
                raise ValueError("an empty string has no embedding")
            return value
        if not isinstance(value, list):
            raise ValueError("give a string or a list of strings (or of token ids, or of lists of token ids)")
        if not value:
            raise ValueError("give at least one input")
        if len(value) > MAX_INPUTS:
            raise ValueError(f"{len(value)} inputs, more than the {MAX_INPUTS} one request may have")
        for index, item in enumerate(value):
            if item == "":
                raise ValueError(f"input[{index}] is an empty string, which has no embedding")
        return _text_or_tokens(value, "input")

    def texts(self) -> list[str]:
        """The inputs that are text (token ids are counted as they are)."""
        if isinstance(self.input, str):
            return [self.input]
        return [item for item in self.input if isinstance(item, str)]

    def token_count(self) -> int:
        """Tokens given as ids; text inputs are counted by the deployment's counter."""
        if isinstance(self.input, str):
            return 0
        return sum(1 if _is_token(item) else len(item) for item in self.input if not isinstance(item, str))


def _text_or_tokens(value: list[Any], name: str) -> list[Any]:
    """A list of strings, of token ids, or of lists of token ids (OpenAI's forms of `input` and `prompt`)."""
    if all(isinstance(item, str) or _is_token(item) for item in value) and len({type(i) for i in value}) == 1:
        return value
    if all(isinstance(item, list) for item in value):
        for index, item in enumerate(value):
            if not item:
                raise ValueError(f"{name}[{index}] is an empty list of token ids")
            if not all(_is_token(token) for token in item):
                raise ValueError(f"{name}[{index}] must hold token ids (integers of 0 or more)")
        return value
    raise ValueError("a list of strings, of token ids or of lists of token ids, not a mix of them")


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
