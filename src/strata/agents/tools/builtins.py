"""The two safe built-ins of the demo agent: a clock and a calculator. Neither has side effects."""

from __future__ import annotations

import ast
import math
import operator
from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field

from strata.agents.tools.base import ToolError
from strata.agents.tools.functions import FunctionTool

# What the model reads: llama-cpp-python's function-calling prompt shows each tool's parameter schema, not its
# description, so each parameter says what it takes. The timezone's pattern also constrains a grammar-guided
# model to one zone name (SmolLM2 once asked for "UTC,US_Pacific").
_ZONE = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"
Timezone = Annotated[str, Field(description="one IANA timezone name, such as UTC or Europe/Paris", pattern=_ZONE)]
Expression = Annotated[str, Field(description="the arithmetic to evaluate, such as 12*7 or (2+3)/4")]


def current_time(timezone: Timezone = "UTC") -> str:
    """The current date and time in an IANA timezone such as 'Europe/Paris'."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown timezone {timezone!r}; use an IANA name such as 'Europe/Paris'") from None
    return datetime.now(zone).isoformat(timespec="seconds")


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "log": math.log, "sin": math.sin, "cos": math.cos}
_CONSTANTS = {"pi": math.pi, "e": math.e}
# Bounds that keep every evaluation to microseconds, so the calculator runs on the event loop: an expression a
# model writes is short, and an integer past ~4,300 digits could not be printed as a result anyway.
MAX_EXPRESSION = 2000  # characters
_MAX_INT_BITS = 16_384


def calculator(expression: Expression) -> str:
    """Evaluate an arithmetic expression, e.g. '(2 + 3) * 4 ** 2' or 'sqrt(2)'."""
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"the expression is too long ({len(expression)} characters, at most {MAX_EXPRESSION})")
    try:
        tree = ast.parse(expression, mode="eval")
        return str(_evaluate(tree.body))
    except ToolError:
        raise
    except RecursionError:
        raise ToolError(f"cannot evaluate {expression[:60]!r}...: nested too deeply") from None
    except (SyntaxError, ArithmeticError, ValueError, TypeError) as exc:
        raise ToolError(f"cannot evaluate {expression!r}: {exc}") from None


def _evaluate(node: ast.AST) -> float | int:
    # Only numbers, arithmetic and a few math functions: never Python's eval.
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > 1000:
                raise ToolError("exponent too large")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > _MAX_INT_BITS:
                raise ToolError("result too large")
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        return _bounded(_FUNCTIONS[node.func.id](*(_evaluate(arg) for arg in node.args)))
    raise ToolError(f"unsupported expression element: {ast.dump(node)[:60]}")


def _bounded(value: float | int) -> float | int:
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise ToolError("result too large")
    return value


def builtin_tools() -> list[FunctionTool]:
    # The calculator is bounded (see MAX_EXPRESSION): it runs inline. The clock may read a timezone file.
    return [FunctionTool(current_time, timeout_s=5), FunctionTool(calculator, timeout_s=5, inline=True)]
