"""Newer OpenAI tool fields: `allowed_tools` narrowed to what every backend takes, `custom` tools refused by name."""

from __future__ import annotations

from typing import Any

import pytest

from strata.serving.errors import RequestNotSupportedError
from strata.serving.tool_fields import normalise_tools


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def _allowed(mode: str, *names: str) -> dict[str, Any]:
    listed = [{"type": "function", "function": {"name": n}} for n in names]
    return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": listed}}


def test_allowed_tools_narrow_the_tools_and_become_the_mode() -> None:
    payload = {
        "messages": [],
        "tools": [_tool("a"), _tool("b"), _tool("c")],
        "tool_choice": _allowed("required", "c", "a"),
    }
    normalised = normalise_tools(payload)
    assert normalised["tools"] == [_tool("a"), _tool("c")]
    assert normalised["tool_choice"] == "required"
    assert payload["tool_choice"]["type"] == "allowed_tools"  # the caller's payload is left as it was


def test_a_payload_without_them_is_returned_as_it_is() -> None:
    payload = {"messages": [], "tools": [_tool("a")], "tool_choice": {"type": "function", "function": {"name": "a"}}}
    assert normalise_tools(payload) is payload


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([{"type": "custom", "custom": {"name": "x"}}], None, "tools[0].type"),
        ([_tool("a")], {"type": "custom", "custom": {"name": "x"}}, "tool_choice.type"),
        ([_tool("a")], _allowed("required", "a", "zz"), "tool_choice.allowed_tools.tools[1]"),
        ([_tool("a")], _allowed("none", "a"), "tool_choice.allowed_tools.mode"),
        ([_tool("a")], _allowed("auto"), "tool_choice.allowed_tools.tools"),
        ([_tool("a")], {"type": "allowed_tools"}, "tool_choice.allowed_tools"),
        (
            [_tool("a")],
            {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{}]}},
            "tool_choice.allowed_tools.tools[0]",
        ),
    ],
)
def test_what_cannot_be_translated_is_refused_naming_it(tools: list[Any], choice: object, param: str) -> None:
    payload: dict[str, Any] = {"messages": [], "tools": tools}
    if choice is not None:
        payload["tool_choice"] = choice
    with pytest.raises(RequestNotSupportedError) as refused:
        normalise_tools(payload)
    assert refused.value.param == param
    assert refused.value.message.startswith(param)
