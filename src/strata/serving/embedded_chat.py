"""Chat with chatml models (SmolLM2, Qwen) inside the embedded model's server, answered in OpenAI's shapes.

This module runs in the model server's process (`embedded_server` registers it), where it takes the place of
llama-cpp-python's `chatml-function-calling` handler. It speaks the same protocol to the model (the system turn
lists the functions; the model answers `message:` and text, or `functions.<name>:` and JSON arguments;
grammars hold it to that), but not that handler's (0.3.x) faults:

- it rendered prompts through Jinja with HTML autoescape on: a tool result `{"a": 1}` reached the model as
  `{&#34;a&#34;: 1}`, and the model copied the entities into its arguments and answers;
- it dropped `tool` messages, so the model never saw a result (here a result is a user turn
  "Result of <name>: ...");
- tool_choice "required" failed an assertion; tools offered without a tool_choice were ignored (OpenAI's
  default is "auto"); it could not stream when it chose a tool itself;
- streamed tool calls repeated the name and id in every chunk (a client adding the chunks up got
  `get_weatherget_weather...`), and answers carried the legacy `function_call` beside `tool_calls`.

Generation stops between two tokens once the request's client has gone (`client_gone`). One tool call per
answer: asked for more, a model this small calls the same function again and again. On the user's turn the
tool (or none) is chosen by a router step that shows the tools' descriptions (`_choose_tool`): continuing the
chat prompt, SmolLM2 called the first-listed tool whatever was asked.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from threading import Event
from typing import Any

from llama_cpp import Llama, LlamaGrammar, StoppingCriteriaList
from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerRegistry
from llama_cpp.llama_grammar import JSON_GBNF

FORMAT = "chatml-function-calling"
START, END = "<|im_start|>", "<|im_end|>"
#: Set by the server around a request whose client may leave; generation stops once the event is set.
client_gone: ContextVar[Event | None] = ContextVar("strata_client_gone", default=None)

SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "typical_p", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "tfs_z", "mirostat_mode", "mirostat_tau", "mirostat_eta", "seed", "logit_bias",
)  # fmt: skip
NO_TOOL = "none"  # the router's answer for "a message, no tool" (a tool of that name wins: it is looked up first)
CHOICE_MAX_TOKENS = 96  # "functions." + a name of at most 64 characters + ":"
INSTRUCTIONS = (
    "\n\nYou can respond to users messages with either a single message or one or more function calls."
    "\n\nTo respond with a message begin the message with 'message:', use the following format:"
    "\n\nmessage:\n<message>"
    "\n\nTo respond with one or more function calls begin the message with 'functions.<function_name>:', "
    "use the following format:"
    '\n\nfunctions.<function_name>:\n{ "arg1": "value1", "arg2": "value2" }'
    '\nfunctions.<function_name>:\n{ "arg1": "value1", "arg2": "value2" }'
)


def register() -> None:
    """Make this the handler of the `chatml-function-calling` format in this process."""
    LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(FORMAT, handle, overwrite=True)


# --- the prompt -----------------------------------------------------------------------------------------------


def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The chatml prompt, as plain text: nothing in a message is escaped or interpreted."""
    names = {
        call.get("id"): (call.get("function") or {}).get("name")
        for message in messages
        if message.get("role") == "assistant"
        for call in message.get("tool_calls") or ()
    }
    described = not tools
    turns = []
    for message in messages:
        role, text = message.get("role"), _text(message.get("content"))
        if role in ("system", "developer"):
            role = "system"
            if not described:
                text, described = text + describe(tools or []), True
        elif role == "assistant":
            text = _assistant_text(message, text, bool(tools))
        elif role in ("tool", "function"):
            name = names.get(message.get("tool_call_id")) or message.get("name") or "the tool"
            role, text = "user", f"Result of {name}: {text}"
        else:
            role = "user"
        turns.append(f"{START}{role}\n{text}{END}\n")
    if not described:
        turns.insert(0, f"{START}system\n{describe(tools or []).lstrip()}{END}\n")
    return "".join(turns) + f"{START}assistant\n"


def describe(tools: list[dict[str, Any]]) -> str:
    listed = "".join(
        f"\nfunctions.{tool['function']['name']}:\n{json.dumps(tool['function'].get('parameters') or {})}\n"
        for tool in tools
    )
    return f"\n\nYou have access to the following functions:\n{listed}{INSTRUCTIONS}"


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _assistant_text(message: dict[str, Any], text: str, with_tools: bool) -> str:
    calls = [call.get("function") or {} for call in message.get("tool_calls") or ()]
    if message.get("function_call"):
        calls.append(message["function_call"])
    parts = [f"message:\n{text}" if with_tools else text] if text else []
    parts.extend(f"functions.{call.get('name')}:\n{call.get('arguments') or '{}'}" for call in calls)
    return "\n".join(parts)


# --- generation -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    text: str
    finish: str | None
    logprobs: dict[str, Any] | None


@dataclass(frozen=True)
class _Delta:
    """One step of the answer: text, the start of a tool call (id, name), its arguments, or the end."""

    content: str | None = None
    call: tuple[str, str] | None = None
    arguments: str | None = None
    finish: str | None = None
    logprobs: list[dict[str, Any]] | None = None


class _Model:
    """One request's completions: its sampling, stops and budget, the usage so far, and its client's presence."""

    def __init__(self, llama: Llama, options: dict[str, Any]) -> None:
        self.llama = llama
        self.sampling = {k: options[k] for k in SAMPLING if options.get(k) is not None}
        stop = options.get("stop") or []
        self.stop = [*([stop] if isinstance(stop, str) else stop), END]
        self.max_tokens = options.get("max_tokens")
        self.model = options.get("model")
        self.logits_processor = options.get("logits_processor")
        gone = self.gone = client_gone.get()
        self.stopping = StoppingCriteriaList([lambda _ids, _logits: gone.is_set()]) if gone is not None else None
        self.prompt_tokens: int | None = None
        self.completion_tokens = 0

    @property
    def client_left(self) -> bool:
        return self.gone is not None and self.gone.is_set()

    def grammar(self, text: str) -> LlamaGrammar:
        return LlamaGrammar.from_string(text, verbose=self.llama.verbose)

    def schema_grammar(self, schema: object) -> LlamaGrammar:
        try:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=self.llama.verbose)
        except Exception:  # a schema the converter cannot take still gets JSON
            return self.grammar(JSON_GBNF)

    def choose(self, prompt: str, grammar: str, *, of_the_request: bool = True) -> str:
        """A short choice held to `grammar` (which function, or a message), taken greedily. A prompt not
        `of_the_request` (the router's) adds its completion tokens, not its prompt, to the usage."""
        result = self.llama.create_completion(
            **{**self.sampling, "temperature": 0.0},
            prompt=prompt,
            max_tokens=CHOICE_MAX_TOKENS,
            stop=[":"],
            grammar=self.grammar(grammar),
            model=self.model,
            logits_processor=self.logits_processor,
            stopping_criteria=self.stopping,
        )
        self._count(result["usage"], of_the_request)
        return str(result["choices"][0]["text"])

    def generate(
        self, prompt: str, grammar: LlamaGrammar | None, stream: bool, logprobs: int | None = None
    ) -> Iterator[_Piece]:
        result = self.llama.create_completion(
            **self.sampling,
            prompt=prompt,
            max_tokens=self.max_tokens,
            stop=self.stop,
            grammar=grammar,
            stream=stream,
            logprobs=logprobs,
            model=self.model,
            logits_processor=self.logits_processor,
            stopping_criteria=self.stopping,
        )
        if isinstance(result, dict):
            self._count(result["usage"])
            choice = result["choices"][0]
            yield _Piece(choice["text"], choice["finish_reason"], choice.get("logprobs"))
            return
        for chunk in result:
            choice = chunk["choices"][0]
            yield _Piece(choice["text"], choice["finish_reason"], choice.get("logprobs"))

    def _count(self, usage: dict[str, int], prompt: bool = True) -> None:
        if prompt and self.prompt_tokens is None:
            self.prompt_tokens = usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]

    def usage(self) -> dict[str, int]:
        prompt = self.prompt_tokens or 0
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}  # fmt: skip


def _answer(
    model: _Model,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    tool_choice: object,
    fmt_grammar: LlamaGrammar | None,
    stream: bool,
    logprobs: int | None,
) -> Iterator[_Delta]:
    if not tools or tool_choice == "none":
        yield from _content(model, render_prompt(messages, None), fmt_grammar, stream, logprobs)
        return
    prompt = render_prompt(messages, tools)
    by_name = {tool["function"]["name"]: tool for tool in tools}
    name = _named(tool_choice)
    if name is None and tool_choice == "required" and len(tools) == 1:
        name = tools[0]["function"]["name"]
    elif name is None:
        name = _choose_tool(model, messages, prompt, tools, required=tool_choice == "required")
        if model.client_left:
            return
    if name is None:
        yield from _content(model, prompt + "message:\n", fmt_grammar, stream, logprobs)
        return
    if name not in by_name:
        raise ValueError(f"tool_choice: a tool named {name!r} was not found in tools")
    yield _Delta(call=(f"call_{uuid.uuid4().hex[:24]}", name))
    finish = "tool_calls"
    parameters = by_name[name]["function"].get("parameters") or {"type": "object", "properties": {}}
    for piece in model.generate(f"{prompt}functions.{name}:\n", model.schema_grammar(parameters), stream):
        if piece.text:
            yield _Delta(arguments=piece.text)
        if piece.finish == "length":
            finish = "length"
    yield _Delta(finish=finish)


def _choose_tool(
    model: _Model, messages: list[dict[str, Any]], prompt: str, tools: list[dict[str, Any]], *, required: bool
) -> str | None:
    """Which tool to call, or None for a message. On the user's turn a router step decides: asked "which of
    these (by their descriptions) answers this message?", a model as small as SmolLM2-135M picks right where,
    continuing its own chat prompt, it called the first-listed tool for nearly anything. After a tool result the
    choice stays in the chat (answering is then the usual next step)."""
    by_name = {tool["function"]["name"]: tool for tool in tools}
    last = messages[-1] if messages else {}
    if last.get("role") == "user" and (question := _text(last.get("content")).strip()):
        choices = [*by_name, *([] if required else [NO_TOOL])]
        grammar = "root ::= " + " | ".join(json.dumps(f" {choice}") for choice in choices) + "\n"
        chosen = model.choose(route_prompt(question, tools, required), grammar, of_the_request=False).strip()
        return chosen if chosen in by_name else None
    options = " | ".join(json.dumps(f"functions.{n}:") for n in by_name)
    root = "functions" if required else 'functions | "message:"'
    chosen = model.choose(prompt, f"root ::= {root}\nfunctions ::= {options}\n").removeprefix("functions.")
    return chosen if chosen in by_name else None


def route_prompt(question: str, tools: list[dict[str, Any]], required: bool) -> str:
    """The router step's prompt: the tools by name and description, the user's message, and "Tool:"."""
    listed = "".join(
        f"\n- {tool['function']['name']}: {tool['function'].get('description') or 'no description'}" for tool in tools
    )
    if not required:
        listed += f"\n- {NO_TOOL}: no tool fits; answer directly."
    system = f"You pick the tool that answers the user's message{'' if required else ', or none'}.\nTools:{listed}"
    return f"{START}system\n{system}{END}\n{START}user\n{question}{END}\n{START}assistant\nTool:"


def _content(
    model: _Model, prompt: str, grammar: LlamaGrammar | None, stream: bool, logprobs: int | None
) -> Iterator[_Delta]:
    finish = "stop"
    for piece in model.generate(prompt, grammar, stream, logprobs):
        if piece.text or piece.logprobs:
            yield _Delta(content=piece.text, logprobs=_chat_logprobs(piece.logprobs))
        finish = piece.finish or finish
    yield _Delta(finish=finish)


def _named(tool_choice: object) -> str | None:
    if isinstance(tool_choice, dict):
        return str((tool_choice.get("function") or {}).get("name") or tool_choice.get("name") or "") or None
    return None


def _chat_logprobs(logprobs: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    if not logprobs:
        return None
    return [
        {
            "token": token,
            "logprob": logprob,
            "bytes": None,
            "top_logprobs": [{"token": t, "logprob": p, "bytes": None} for t, p in (top or {}).items()],
        }
        for token, logprob, top in zip(
            logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=False
        )
    ]


# --- OpenAI's shapes ------------------------------------------------------------------------------------------


def _completion(
    deltas: Iterator[_Delta], ident: str, created: int, name: str, model: _Model, logprobs: bool
) -> dict[str, Any]:
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    tokens: list[dict[str, Any]] = []
    finish = "stop"
    for delta in deltas:
        if delta.content is not None:
            content.append(delta.content)
            tokens.extend(delta.logprobs or ())
        if delta.call is not None:
            call_id, function = delta.call
            calls.append({"id": call_id, "type": "function", "function": {"name": function, "arguments": ""}})
        if delta.arguments is not None:
            calls[-1]["function"]["arguments"] += delta.arguments
        finish = delta.finish or finish
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) if content or not calls else None}
    if calls:
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "logprobs": _logprobs(tokens) if logprobs else None}
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": name,
        "choices": [{**choice, "finish_reason": finish}],
        "usage": model.usage(),
    }


def _chunks(deltas: Iterator[_Delta], ident: str, created: int, name: str) -> Iterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: object = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [choice]}  # fmt: skip

    started = False
    for delta in deltas:
        if delta.call is not None:
            call_id, function = delta.call
            call = {"index": 0, "id": call_id, "type": "function", "function": {"name": function, "arguments": ""}}
            yield chunk({"role": "assistant", "content": None, "tool_calls": [call]})
            started = True
        elif delta.arguments is not None:
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": delta.arguments}}]})
        elif delta.content is not None:
            if not started:
                yield chunk({"role": "assistant", "content": ""})
                started = True
            yield chunk({"content": delta.content}, logprobs=_logprobs(delta.logprobs) if delta.logprobs else None)
        elif delta.finish is not None:
            if not started:
                yield chunk({"role": "assistant", "content": ""})
            yield chunk({}, finish=delta.finish)


def _logprobs(tokens: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"content": tokens or [], "refusal": None}


# --- the handler ----------------------------------------------------------------------------------------------


def handle(
    *,
    llama: Llama,
    messages: list[dict[str, Any]],
    functions: list[dict[str, Any]] | None = None,
    function_call: object = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: object = None,
    stream: bool = False,
    response_format: dict[str, Any] | None = None,
    grammar: LlamaGrammar | None = None,
    logprobs: bool | None = None,
    top_logprobs: int | None = None,
    **options: Any,
) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """llama-cpp-python's chat-handler signature: `Llama.create_chat_completion` calls it with the request."""
    if functions and not tools:  # the legacy names of tools and tool_choice
        tools = [{"type": "function", "function": function} for function in functions]
    if function_call is not None and tool_choice is None:
        tool_choice = {"function": function_call} if isinstance(function_call, dict) else function_call
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    model = _Model(llama, options)
    if response_format and response_format.get("type") == "json_object":
        schema = response_format.get("schema")
        grammar = model.schema_grammar(schema) if schema else model.grammar(JSON_GBNF)
    count = (top_logprobs or 0) if logprobs else None
    deltas = _answer(model, messages, tools or [], tool_choice, grammar, stream, count)
    ident, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())
    name = model.model or llama.model_path
    if stream:
        return _chunks(deltas, ident, created, name)
    return _completion(deltas, ident, created, name, model, bool(logprobs))
