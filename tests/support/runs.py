"""Waiting on an agent run of a test server."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.support.strata_process import StrataProcess

ENDED = ("completed", "failed", "cancelled")


def agent(name: str, **extra: Any) -> dict[str, Any]:
    """An agent of the config on the mock model (`tests.conftest.mock_model`)."""
    return {"name": name, "model": "mock-model", "system_prompt": "You are a test agent.", **extra}


def wait_status(
    strata: StrataProcess, run_id: str, statuses: tuple[str, ...] = ENDED, timeout_s: float = 20
) -> dict[str, Any]:
    """The run (read with the admin key) once its status is one of `statuses`; a server that does not answer
    yet (restarting) is waited for too."""
    deadline = time.monotonic() + timeout_s
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            run = httpx.get(f"{strata.url}/v1/runs/{run_id}", headers=strata.headers, timeout=5).json()
        except httpx.HTTPError:
            time.sleep(0.1)
            continue
        if run["status"] in statuses:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached {statuses}: {run}")
