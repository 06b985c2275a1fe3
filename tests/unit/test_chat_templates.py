"""The prompts Strata builds for models served raw (kind: triton)."""

from __future__ import annotations

import pytest

from strata.serving.chat_templates import render

MESSAGES = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    {"role": "assistant", "content": None},
]


def test_chatml_llama3_and_plain() -> None:
    assert render(MESSAGES, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(MESSAGES[:2], "llama3") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render(MESSAGES[:2], "plain") == "system: Be brief.\nuser: Hi there\nassistant:"


def test_content_that_is_not_text_is_refused() -> None:
    with pytest.raises(ValueError, match="string or a list of text parts"):
        render([{"role": "user", "content": 42}], "chatml")
