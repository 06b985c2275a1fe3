"""Child runs on a server with one worker: a parent waiting for its children gives its worker back (a fan-out wider
than the workers finishes), and cancelling the parent cancels the children still going."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StrataProcess, MockBackend]]:
    with MockBackend(api_key="mock-secret") as mock:
        config = {
            "models": [mock_model(mock)],
            "agents": [
                {"name": "research", "model": "mock-model", "entrypoint": "examples.fan_out:research"},
                {"name": "researcher", "model": "mock-model"},
            ],
            "runs": {"workers": 1, "lease_s": 2, "poll_s": 0.05},
        }
        process = StrataProcess(tmp_path_factory.mktemp("children"), config, env={"MOCK_API_KEY": "mock-secret"})
        process.start()
        try:
            yield process, mock
        finally:
            assert process.stop() == 0


def start(server: StrataProcess, text: str) -> str:
    response = httpx.post(
        f"{server.url}/v1/agents/research/runs", json={"input": text, "mode": "background"}, headers=server.headers
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def runs_of(server: StrataProcess, agent: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/v1/runs", params={"agent": agent, "limit": 100}, headers=server.headers)
    response.raise_for_status()
    return list(response.json()["data"])


def wait_for(server: StrataProcess, run_id: str, statuses: tuple[str, ...], timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        run = httpx.get(f"{server.url}/v1/runs/{run_id}", headers=server.headers).json()
        if run["status"] in statuses:
            return dict(run)
        assert time.monotonic() < deadline, f"run {run_id} is still {run['status']}, not {statuses}"
        time.sleep(0.05)


def test_a_fan_out_wider_than_the_workers_finishes(server: tuple[StrataProcess, MockBackend]) -> None:
    process, mock = server
    mock.reset()
    mock.default = Reply(echo=True)
    run = wait_for(process, start(process, "cats, dogs, owls"), ("completed", "failed"))
    assert run["status"] == "completed", run["status_reason"]
    assert run["output"].splitlines() == [f"{t}: Summarise in one line: {t}" for t in ("cats", "dogs", "owls")]
    events = httpx.get(f"{process.url}/v1/runs/{run['id']}/events", headers=process.headers, timeout=10).text
    assert "event: run.suspended" in events, "the parent gave its only worker to its children"


def test_cancelling_a_parent_cancels_its_children(server: tuple[StrataProcess, MockBackend]) -> None:
    process, mock = server
    mock.reset()
    mock.default = Reply(content="slow", latency_s=30)
    parent = start(process, "ants, bees")
    wait_for(process, parent, ("waiting",))
    children = [r for r in runs_of(process, "researcher") if r["status"] not in ("completed", "failed", "cancelled")]
    assert len(children) == 2
    httpx.post(f"{process.url}/v1/runs/{parent}/cancel", headers=process.headers).raise_for_status()
    assert wait_for(process, parent, ("cancelled",))["status_reason"] == "cancelled by request"
    for child in children:
        assert wait_for(process, child["id"], ("cancelled",))["status_reason"] == "cancelled by request"
