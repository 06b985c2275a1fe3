"""The built-in calculator runs on the event loop, so every evaluation must stay bounded in time."""

from __future__ import annotations

import time

import pytest

from strata.agents.tools.base import ToolContext, ToolError
from strata.agents.tools.builtins import MAX_EXPRESSION, builtin_tools, calculator


@pytest.mark.parametrize(
    ("expression", "value"),
    [("(2 + 3) * 4 ** 2", "80"), ("sqrt(16)", "4.0"), ("-7 // 2", "-4"), ("2 ** 100", str(2**100))],
)
def test_it_evaluates_arithmetic(expression: str, value: str) -> None:
    assert calculator(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "(9 ** 999) ** 999",  # millions of bits: refused before it is computed
        "((9 ** 999) ** 999) ** 999",
        "9 ** 999 * 9 ** 999 * 9 ** 999 * 9 ** 999 * 9 ** 999 * 9 ** 999",
        "1" + "+1" * 1200,  # deeper than the recursion limit
        "1" * (MAX_EXPRESSION + 1),
        "2 ** 5000",
    ],
)
def test_huge_or_deep_expressions_fail_fast(expression: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ToolError):
        calculator(expression)
    assert time.perf_counter() - started < 0.5


async def test_the_calculator_tool_answers_inline() -> None:
    tool = next(t for t in builtin_tools() if t.name == "calculator")
    result = await tool.invoke({"expression": "6 * 7"}, ToolContext("run", "run:0:c", 5))
    assert (result.content, result.is_error) == ("42", False)


async def test_the_clock_takes_one_zone_name_and_says_so_in_its_schema() -> None:
    """Small models read the parameter schema, not the description; a grammar built from it allows one zone."""
    tool = next(t for t in builtin_tools() if t.name == "current_time")
    timezone = tool.spec.parameters["properties"]["timezone"]
    assert "IANA" in timezone["description"] and timezone["pattern"]
    context = ToolContext("run", "run:0:call", 5)
    for zone in ("UTC", "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT+5", "EST5EDT"):
        assert not (await tool.invoke({"timezone": zone}, context)).is_error, zone
    with pytest.raises(ToolError, match="invalid arguments"):
        await tool.invoke({"timezone": "UTC,US_Pacific"}, context)
    calculator_tool = next(t for t in builtin_tools() if t.name == "calculator")
    assert "12*7" in calculator_tool.spec.parameters["properties"]["expression"]["description"]
