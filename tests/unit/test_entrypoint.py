"""A code agent's `entrypoint` is found once, and a wrong one is refused with what is wrong."""

from __future__ import annotations

import pytest

from strata.agents.durable.entrypoint import EntrypointError, load_entrypoint
from strata.config import AgentConfig


def test_an_async_function_is_found() -> None:
    from examples.router import route

    assert load_entrypoint("examples.router:route") is route


@pytest.mark.parametrize(
    ("entrypoint", "why"),
    [
        ("examples.nowhere:route", "cannot import 'examples.nowhere'"),
        ("examples.router:nothing", "'examples.router:nothing' is not a function"),
        ("examples.plan_execute:numbered_lines", "is not an async function"),
    ],
)
def test_a_wrong_entrypoint_says_what_is_wrong(entrypoint: str, why: str) -> None:
    with pytest.raises(EntrypointError, match=why):
        load_entrypoint(entrypoint)


def test_the_config_refuses_what_is_not_module_colon_function() -> None:
    for bad in ("examples.router", "examples/router.py:route", "examples.router:route()"):
        with pytest.raises(ValueError, match="entrypoint"):
            AgentConfig(name="a", model="m", entrypoint=bad)
