"""Python-function tools for agent tests, referenced by import path from test configs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from strata.agents.tools.base import ToolContext


def record_call(label: str, context: ToolContext) -> str:
    """Record a side effect: append this call's idempotency key to $TEST_SIDE_EFFECTS_LOG."""
    path = Path(os.environ["TEST_SIDE_EFFECTS_LOG"])
    with path.open("a") as handle:
        handle.write(f"{context.idempotency_key} {label}\n")
    return f"recorded {label}"


def slow_echo(text: str, seconds: float = 1.0) -> str:
    """Echo `text` after sleeping `seconds`."""
    time.sleep(seconds)
    return text
