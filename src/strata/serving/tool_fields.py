"""Newer OpenAI tool fields on chat completions, put in the form every backend kind takes, or refused by name.

- `tool_choice: {"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}` lets the model call only some of
  the `tools` (OpenAI added it so the tool list, and the prompt cache, stays the same across turns). It becomes
  `tools` narrowed to the allowed ones and `tool_choice` its `mode`: the model can call exactly what it could
  call before; only the prompt-cache saving is lost.
- `custom` tools (free-form text input, optionally a grammar) have no equivalent in the function-calling
  backends Strata serves: refused with a 400 naming the tool.
"""

from __future__ import annotations

from typing import Any

from strata.serving.errors import RequestNotSupportedError

ALLOWED_MODES = ("auto", "required")


def normalise_tools(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` itself when it has none of these fields (the common case), else a changed copy."""
    tools, choice = payload.get("tools"), payload.get("tool_choice")
    if isinstance(tools, list):
        for index, tool in enumerate(tools):
            if isinstance(tool, dict) and tool.get("type") == "custom":
                raise RequestNotSupportedError(
                    f"tools[{index}].type: 'custom' tools (free-form text input) are not supported; "
                    "declare the tool as type 'function' with a JSON schema for its arguments",
                    param=f"tools[{index}].type",
                )
    if not isinstance(choice, dict):
        return payload
    if choice.get("type") == "custom":
        raise RequestNotSupportedError(
            "tool_choice.type: 'custom' tools are not supported; name a function tool", param="tool_choice.type"
        )
    if choice.get("type") != "allowed_tools":
        return payload
    mode, names = _allowed(choice.get("allowed_tools"))
    offered = {_name(tool) for tool in tools or () if isinstance(tool, dict)}
    for index, name in enumerate(names):
        if name not in offered:
            raise RequestNotSupportedError(
                f"tool_choice.allowed_tools.tools[{index}]: names function {name!r}, which is not among 'tools'",
                param=f"tool_choice.allowed_tools.tools[{index}]",
            )
    narrowed = [tool for tool in tools or () if isinstance(tool, dict) and _name(tool) in names]
    return {**payload, "tools": narrowed, "tool_choice": mode}


def _allowed(value: object) -> tuple[str, list[str]]:
    param = "tool_choice.allowed_tools"
    if not isinstance(value, dict):
        raise RequestNotSupportedError(f"{param}: an object with 'mode' and 'tools' is required", param=param)
    mode = value.get("mode")
    if mode not in ALLOWED_MODES:
        where = f"{param}.mode"
        raise RequestNotSupportedError(f"{where}: must be 'auto' or 'required', not {mode!r}", param=where)
    listed = value.get("tools")
    if not isinstance(listed, list) or not listed:
        raise RequestNotSupportedError(f"{param}.tools: a non-empty list of tools is required", param=f"{param}.tools")
    names = []
    for index, tool in enumerate(listed):
        name = _name(tool) if isinstance(tool, dict) and tool.get("type") == "function" else None
        if name is None:
            where = f"{param}.tools[{index}]"
            raise RequestNotSupportedError(
                f'{where}: must be {{"type": "function", "function": {{"name": ...}}}}', param=where
            )
        names.append(name)
    return str(mode), names


def _name(tool: dict[str, Any]) -> str | None:
    function = tool.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None
