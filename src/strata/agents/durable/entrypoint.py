"""Find the function a code agent's `entrypoint` names (`package.module:function`), once per process."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from strata.agents.tools.functions import load_function

AgentFunction = Callable[[Any], Awaitable[Any]]


class EntrypointError(ValueError):
    """The entrypoint names nothing importable, or not an async function (a config error, like a bad tool path)."""


@cache
def load_entrypoint(entrypoint: str) -> AgentFunction:
    try:
        function = load_function(entrypoint)
    except ValueError as exc:
        raise EntrypointError(f"entrypoint: {exc}") from None
    if not inspect.iscoroutinefunction(function):
        raise EntrypointError(f"entrypoint {entrypoint!r} is not an async function (async def f(ctx): ...)")
    return function  # type: ignore[no-any-return]
