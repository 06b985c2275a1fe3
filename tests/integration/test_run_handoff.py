"""The hand-off: a run opening a conversation on a replica whose worker has a free slot is created already
claimed by that worker and starts at once; with no free slot it waits in the queue as before, and is still run."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    config = {
        "models": [mock_model(mock_backend, input_usd_per_mtok=1000.0, output_usd_per_mtok=2000.0)],
        "agents": [{"name": "solo", "model": "mock-model", "tools": ["calculator"]}],
        "runs": {"workers": 1, "lease_s": 2, "poll_s": 0.1},  # one slot: a second run finds the worker full
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    process = StrataProcess(tmp_path_factory.mktemp("handoff"), config, env={"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


def start(strata: StrataProcess, text: str, **body: object) -> httpx.Response:
    return httpx.post(
        f"{strata.url}/v1/agents/solo/runs", json={"input": text, **body}, headers=strata.headers, timeout=30
    )


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_a_run_created_while_the_worker_is_full_is_completed_after_it(
    strata: StrataProcess, mock_backend: MockBackend
) -> None:
    mock_backend.script(Reply(content="first, slowly", latency_s=1.0), Reply(content="second"))
    first = start(strata, "one", mode="background")
    assert first.status_code == 202
    assert first.json()["status"] == "running", "a free slot: created already claimed by the worker"
    second = start(strata, "two")  # sync: queued behind the busy worker, then claimed and answered
    assert second.status_code == 200, second.text
    body = second.json()
    assert (body["status"], body["output"], body["attempts"]) == ("completed", "second", 1)
    assert [(s["kind"], s["status"]) for s in body["steps"]] == [("model", "completed")]
    done = httpx.get(f"{strata.url}/v1/runs/{first.json()['id']}", headers=strata.headers).json()
    assert (done["status"], done["output"], done["attempts"]) == ("completed", "first, slowly", 1)
    assert at(body["started_at"]) >= at(done["finished_at"]), "the second run waited for the worker's slot"
    assert body == httpx.get(f"{strata.url}/v1/runs/{body['id']}", headers=strata.headers).json(), (
        "the sync answer is the run as stored"
    )


def test_a_handed_off_sync_run_answers_as_stored(strata: StrataProcess, mock_backend: MockBackend) -> None:
    calc = [Reply(tool_calls=[ToolCallSpec("calculator", {"expression": f"{n}*7"})]) for n in range(3)]
    mock_backend.script(*calc, Reply(content="at once"))
    answer = start(strata, "hello")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["status"], body["output"], body["attempts"], body["steps_taken"]) == ("completed", "at once", 1, 4)
    assert len(body["steps"]) == 7 and body["cost_usd"] > 0
    assert body["started_at"] == body["created_at"], "no wait for a claim"
    stored = httpx.get(f"{strata.url}/v1/runs/{body['id']}", headers=strata.headers).json()
    assert body == stored, "the sync answer (from the worker's own view of the run) is the run as stored"
