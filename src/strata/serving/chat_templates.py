"""Chat messages as the prompt text of a model served raw (Triton/TensorRT-LLM ensembles take text, not
messages). The common instruct formats; a model that needs another takes `plain` or a server-side template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

Template = Literal["chatml", "llama3", "plain"]
STOPS: dict[str, list[str]] = {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"], "plain": []}


def text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ValueError("content must be a string or a list of text parts")


def render(messages: Sequence[dict[str, Any]], template: Template) -> str:
    """The prompt, ending where the assistant's answer begins."""
    turns = [(str(m.get("role", "user")).replace("developer", "system"), text_of(m.get("content"))) for m in messages]
    if template == "chatml":
        body = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)
        return body + "<|im_start|>assistant\n"
    if template == "llama3":
        body = "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>" for role, text in turns)
        return "<|begin_of_text|>" + body + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return "".join(f"{role}: {text}\n" for role, text in turns) + "assistant:"
