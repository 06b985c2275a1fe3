"""The embedded model's function-calling prompt is plain text: quotes reach the model as quotes.

llama-cpp-python renders `chatml-function-calling` prompts with HTML autoescaping, so SmolLM2 read (and wrote
back) `&#34;` for every quote. `strata.serving.llama_server` turns that off in the launched server."""

from __future__ import annotations

from typing import Any

import pytest

llama_chat_format = pytest.importorskip("llama_cpp.llama_chat_format")

from strata.serving.llama_server import unescape_chat_templates  # noqa: E402

TOOL = {
    "type": "function",
    "function": {"name": "current_time", "parameters": {"type": "object", "properties": {"timezone": {}}}},
}
MESSAGES = [
    {"role": "system", "content": "Answer 'briefly' & <kindly>."},
    {"role": "user", "content": 'What is "12*7"?'},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "current_time", "arguments": '{"timezone": "UTC"}'}}
        ],
    },
    {"role": "user", "content": "Result of current_time: it's 12:00"},
]


class _PromptSeen(Exception):
    pass


class _Llama:
    """Stands in for the model: keeps the prompt the handler renders, and stops there."""

    verbose = False

    def __init__(self) -> None:
        self.prompt = ""

    def create_completion(self, prompt: str, **_: Any) -> Any:
        self.prompt = prompt
        raise _PromptSeen


def rendered() -> str:
    llama = _Llama()
    with pytest.raises(_PromptSeen):
        llama_chat_format.chatml_function_calling(llama, MESSAGES, tools=[TOOL], tool_choice="auto")
    return llama.prompt


def test_the_function_calling_prompt_keeps_quotes_and_ampersands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        llama_chat_format, "ImmutableSandboxedEnvironment", llama_chat_format.ImmutableSandboxedEnvironment
    )
    assert unescape_chat_templates()
    prompt = rendered()
    assert "&#" not in prompt and "&amp;" not in prompt and "&lt;" not in prompt
    assert 'What is "12*7"?' in prompt and "Answer 'briefly' & <kindly>." in prompt
    assert '{"timezone": "UTC"}' in prompt and "it's 12:00" in prompt
