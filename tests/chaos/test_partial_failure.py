"""Partial failure against a real `strata serve`: replicas that fail a share of requests, requests that
fail by their own fault, a replica asking for a pause, and a hot swap while a retry waits. Strata must
pass on no more failure than retries cannot absorb, never shut a model out with its breakers, and
never let one client's bad requests or one replica's Retry-After cost anyone else."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.test_hot_swap import LOOPBACK_DEPLOYS
from tests.chaos.test_resilience import BODY, breaker_states, fire, metric, replicas, serve
from tests.support.mock_backend import MockBackend, Reply, fastapi_validation_error, llama_cpp_assertion
from tests.support.strata_process import StrataProcess

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture
def pair() -> Iterator[tuple[MockBackend, MockBackend]]:
    a, b = MockBackend().start(), MockBackend().start()
    yield a, b
    a.stop()
    b.stop()


def deployments(strata: StrataProcess) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{strata.url}/admin/deployments", headers=strata.headers).json()["data"]
    return {d["target"]: d for d in data}


def codes(responses: list[httpx.Response]) -> Counter[str]:
    return Counter("ok" if r.status_code == 200 else r.json()["error"]["code"] for r in responses)


async def test_two_replicas_failing_30_percent_lose_only_what_retries_cannot_save(
    tmp_path: Path, pair: tuple[MockBackend, MockBackend]
) -> None:
    for backend in pair:
        backend.error_rate, backend.error_status = 0.3, 500
    strata = serve(tmp_path, [replicas(*pair)])  # the default retry and breaker settings
    try:
        responses = await fire(strata, 400, 20)
        seen = codes(responses)
        assert "circuit_open" not in seen, seen
        # Three attempts each at 30%: about 2.7% fail (11 of 400); a breaker storm would fail most.
        assert seen["ok"] >= 380, seen
        assert all(b.chat_attempts > 100 for b in pair), "both replicas kept their share"

        for backend in pair:
            backend.error_rate = 0.0  # recovered
        assert codes(await fire(strata, 200, 20)) == {"ok": 200}
        assert set(breaker_states(strata).values()) == {"closed"}
    finally:
        strata.stop()


async def test_breakers_never_shut_a_model_out_and_recover_without_a_failed_request(
    tmp_path: Path, pair: tuple[MockBackend, MockBackend]
) -> None:
    for backend in pair:
        backend.error_rate, backend.error_status = 1.0, 500
    strata = serve(tmp_path, [replicas(*pair)])
    try:
        down = await fire(strata, 60, 4)
        # Every replica fails: clients get the backend's error, not a refusal in the breakers' name.
        assert codes(down) == {"upstream_error": 60}
        view = deployments(strata)
        assert {d["breaker"]["state"] for d in view.values()} <= {"open", "half_open"}
        assert all(d["panic"] for d in view.values())
        assert metric(strata, 'strata_model_panic{model="llm"}') == 1
        assert metric(strata, 'strata_panic_attempts_total{model="llm"}') > 0
        attempts = sum(b.chat_attempts for b in pair)

        for backend in pair:
            backend.error_rate = 0.0  # recovered, while both breakers are still open
        assert codes(await fire(strata, 100, 4)) == {"ok": 100}
        assert sum(b.chat_attempts for b in pair) == attempts + 100, "no retry was needed"
        deadline = time.monotonic() + 30
        while set(breaker_states(strata).values()) != {"closed"} and time.monotonic() < deadline:
            assert codes(await fire(strata, 10, 2)) == {"ok": 10}  # half-open probes ride on real requests
            await asyncio.sleep(0.2)
        assert set(breaker_states(strata).values()) == {"closed"}
        assert metric(strata, 'strata_model_panic{model="llm"}') == 0
        assert not any(d["panic"] for d in deployments(strata).values())
    finally:
        strata.stop()


async def test_a_circuit_open_answer_says_when_the_next_probe_is_due(tmp_path: Path) -> None:
    with MockBackend() as down:
        down.error_rate, down.error_status = 1.0, 500
        model = replicas(down, breaker={"open_s": 8, "panic_threshold": 0})  # no panic: fail fast
        strata = serve(tmp_path, [model])
        try:
            refused = None
            for _ in range(40):
                (response,) = await fire(strata, 1, 1)
                if response.status_code == 503:
                    refused = response
                    break
            assert refused is not None and refused.json()["error"]["code"] == "circuit_open"
            # It opened a moment ago for 8 s: the first probe is due in about 8 s, not in 1.
            assert 5 <= int(refused.headers["retry-after"]) <= 8
            before = down.chat_attempts
            assert codes(await fire(strata, 10, 2)) == {"circuit_open": 10}
            assert down.chat_attempts == before, "while open, nothing reaches the backend"
        finally:
            strata.stop()


async def test_a_request_the_backend_cannot_process_is_one_clients_400_and_nobody_elses_problem(
    tmp_path: Path, pair: tuple[MockBackend, MockBackend]
) -> None:
    for backend in pair:
        # llama-cpp-python's chatml-function-calling handler asserts tool_choice is "auto": 500, empty message.
        backend.when({"tool_choice": "required"}, llama_cpp_assertion())
        backend.when({"repeat_penalty": -1}, fastapi_validation_error(["repeat_penalty"], "Input should be > 0"))
    strata = serve(tmp_path, [replicas(*pair)])
    try:
        careless, other = strata.create_key(name="careless"), strata.create_key(name="other")
        async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {careless}"}) as client:
            url = f"{strata.base_url}/chat/completions"
            required = [await client.post(url, json={**BODY, "tools": TOOLS, "tool_choice": "required"})
                        for _ in range(8)]  # fmt: skip
            invalid = [await client.post(url, json={**BODY, "repeat_penalty": -1}) for _ in range(2)]
        for response in required:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "upstream_rejected_request"
            assert "HTTP 500" in error["message"] and "gave no reason" in error["message"]
        for response in invalid:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["message"], error["param"]) == ("repeat_penalty: Input should be > 0", "repeat_penalty")
        assert sum(b.chat_attempts for b in pair) == 10, "a request's own fault is never retried"
        assert metric(strata, 'strata_retries_total{model="llm"}') == 0
        view = deployments(strata)
        assert {d["breaker"]["state"] for d in view.values()} == {"closed"}
        assert sum(d["breaker"]["window_failures"] for d in view.values()) == 0, "the breakers counted nothing"

        async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {other}"}) as client:
            others = [await client.post(f"{strata.base_url}/chat/completions", json=BODY) for _ in range(20)]
        assert [r.status_code for r in others] == [200] * 20
    finally:
        strata.stop()
    assert '"unhandled error"' not in strata.logs()


async def test_retry_after_from_one_replica_sends_the_request_to_another_at_once(tmp_path: Path) -> None:
    with MockBackend() as paused, MockBackend() as steady, MockBackend() as alone:
        paused.default = Reply(status=503, retry_after="30")
        steady.default = Reply(content="from the steady replica")
        alone.script(Reply(status=503, retry_after="1"))  # then answers
        models = [
            replicas(paused, steady, retry={"backoff_max_s": 60}),  # a 30 s Retry-After could be waited out
            {"kind": "openai", "name": "solo", "base_url": alone.url},
        ]
        strata = serve(tmp_path, models)
        try:
            # Waiting out the 30 s would run into the client's 15 s timeout.
            async with httpx.AsyncClient(timeout=15, headers=strata.headers) as client:
                limiter = asyncio.Semaphore(3)

                async def one() -> httpx.Response:
                    async with limiter:
                        return await client.post(f"{strata.base_url}/chat/completions", json=BODY)

                responses = await asyncio.gather(*(one() for _ in range(30)))
                assert [r.status_code for r in responses] == [200] * 30
                assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {"from the steady replica"}
                assert paused.chat_attempts >= 1, "the paused replica was tried"
                assert paused.chat_attempts <= 3, "after its Retry-After, other requests went to the other first"
                assert 0 < deployments(strata)[paused.url]["paused_s"] <= 30

                # With no other deployment to take it, the Retry-After is waited out.
                solo = await client.post(f"{strata.base_url}/chat/completions", json={**BODY, "model": "solo"})
            assert solo.status_code == 200
            first, second = alone.chat_requests()
            assert second.received_at - first.received_at >= 0.9
        finally:
            strata.stop()


async def test_a_retry_waiting_through_a_hot_swap_goes_to_the_new_version(tmp_path: Path) -> None:
    with MockBackend() as old, MockBackend() as new:
        old.default = Reply(status=503, retry_after="3")  # every request waits 3 s before its retry
        new.default = Reply(content="new version")
        model = {"kind": "openai", "name": "llm", "base_url": old.url, "retry": {"max_attempts": 5}}
        strata = serve(tmp_path, [model], LOOPBACK_DEPLOYS)  # the mock backends are on loopback
        try:
            async with httpx.AsyncClient(timeout=60, headers=strata.headers) as client:
                url = f"{strata.base_url}/chat/completions"
                # Four: fewer than the failures in a row that would open the breaker at this low traffic.
                waiting = [asyncio.create_task(client.post(url, json=BODY)) for _ in range(4)]
                deadline = time.monotonic() + 10
                while old.chat_attempts < 4 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert old.chat_attempts >= 4
                # The new version comes in while they wait; the old one drains at once (nothing in flight).
                deployed = await client.post(
                    f"{strata.url}/admin/models/llm/deploy", json={"kind": "openai", "base_url": new.url}
                )
                assert deployed.status_code == 200, deployed.text
                responses = await asyncio.gather(*waiting)
            assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
            assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {"new version"}
        finally:
            strata.stop()
