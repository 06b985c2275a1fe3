"""A key's model allow-list holds through agents: for the agent's model, and for its fallback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply
from tests.support.runs import wait_status
from tests.support.strata_process import StrataProcess


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    config = {
        "models": [
            {"kind": "openai", "name": "m1", "base_url": "http://127.0.0.1:9/v1"},  # nothing listens: it fails
            mock_model(mock_backend, "m2"),
            # A model-level fallback (the serving layer's, not the agent's): dead, then m2.
            {"kind": "openai", "name": "m3", "base_url": "http://127.0.0.1:9/v1", "fallbacks": ["m2"]},
        ],
        "agents": [
            {"name": "on-m2", "model": "m2"},
            {"name": "m1-first", "model": "m1", "fallback_model": "m2"},
            {"name": "on-m3", "model": "m3"},
        ],
        "runs": {"lease_s": 2, "poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    process = StrataProcess(tmp_path_factory.mktemp("scope"), config, env={"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


def start(strata: StrataProcess, key: str, agent: str, **body: Any) -> httpx.Response:
    with strata.client(key, timeout=30) as client:
        return client.post(f"/v1/agents/{agent}/runs", json={"input": "hi", **body})


def test_a_key_limited_to_m1_cannot_run_an_agent_on_m2(strata: StrataProcess, mock_backend: MockBackend) -> None:
    key = strata.create_key("user", name="only-m1", models=["m1"])
    for mode in ("sync", "background", "stream"):
        refused = start(strata, key, "on-m2", mode=mode)
        assert refused.status_code == 403, (mode, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "model_not_allowed"
        assert "'m2'" in error["message"]
    assert mock_backend.chat_requests() == [], "no model call was made for a refused run"
    # The socket refuses it too, naming the model, and nothing is called.
    url = strata.url.replace("http://", "ws://") + "/v1/agents/on-m2/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=5) as socket:
        socket.send(json.dumps({"type": "message", "input": "hi"}))
        reply = json.loads(socket.recv(timeout=10))
    assert reply["type"] == "error" and "'m2'" in reply["message"], reply
    assert mock_backend.chat_requests() == []
    # A key that may use m2 runs it.
    allowed = start(strata, strata.create_key("user", name="m1-and-m2", models=["m1", "m2"]), "on-m2")
    assert (allowed.status_code, allowed.json()["status"]) == (200, "completed")


def test_a_fallback_the_key_may_not_use_is_not_tried(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="answered by m2"))
    key = strata.create_key("user", name="m1-fallback", models=["m1"])
    response = start(strata, key, "m1-first", mode="background")
    assert response.status_code == 202, response.text
    run = wait_status(strata, response.json()["id"])
    assert run["status"] == "failed", run
    assert "fallback 'm2' not tried" in run["status_reason"], run["status_reason"]
    assert mock_backend.chat_requests() == [], "the run reached m2, which its key may not use"
    events = httpx.get(f"{strata.url}/v1/runs/{run['id']}/events", headers=strata.headers, timeout=10).text
    assert "event: run.fallback" not in events


def test_a_fallback_the_key_may_use_takes_over(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="answered by m2"))
    key = strata.create_key("user", name="both", models=["m1", "m2"])
    run = start(strata, key, "m1-first").json()
    assert (run["status"], run["output"]) == ("completed", "answered by m2"), run
    assert [r.body["model"] for r in mock_backend.chat_requests()] == ["upstream-m2"]


def test_a_models_own_fallback_holds_to_the_key_too(strata: StrataProcess, mock_backend: MockBackend) -> None:
    """`models[].fallbacks` is followed by the serving layer, for chat and agent steps alike: never past the key."""
    chat = {"model": "m3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    only_m3 = strata.create_key("user", name="only-m3", models=["m3"])
    with strata.client(only_m3, timeout=30) as client:
        refused = client.post("/v1/chat/completions", json=chat)
    assert refused.status_code >= 500, refused.text  # m3 is down and its fallback is not this key's to use
    run = start(strata, only_m3, "on-m3").json()
    assert run["status"] == "failed", run
    assert mock_backend.chat_requests() == [], "a request made with an m3-only key reached m2"
    # A key that may use both gets m2's answer.
    mock_backend.script(Reply(content="m2 stood in"), Reply(content="m2 stood in"))
    both = strata.create_key("user", name="m3-and-m2", models=["m3", "m2"])
    with strata.client(both, timeout=30) as client:
        answered = client.post("/v1/chat/completions", json=chat)
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"] == "m2 stood in"
    run = start(strata, both, "on-m3").json()
    assert (run["status"], run["output"]) == ("completed", "m2 stood in"), run
