"""Chaos against a real `strata serve`: replicas that fail, hang, vanish or drown; Strata must absorb
what can be absorbed, fail fast and clearly on the rest, and never amplify an outage."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess

BODY = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def mocks() -> Iterator[list[MockBackend]]:
    backends = [MockBackend().start() for _ in range(3)]
    yield backends
    for backend in backends:
        backend.stop()


def serve(
    tmp_path: Path, models: list[dict[str, Any]], extra: dict[str, Any] | None = None, **server: Any
) -> StrataProcess:
    config = {
        "models": models,
        "agents": [],
        "server": {"health_interval_s": 0.2, "drain_delay_s": 0, **server},
        **(extra or {}),
    }
    return StrataProcess(tmp_path, config).start()


def replicas(*backends: MockBackend, **extra: Any) -> dict[str, Any]:
    return {"kind": "openai", "name": "llm", "deployments": [{"base_url": b.url} for b in backends], **extra}


async def fire(
    strata: StrataProcess, count: int, concurrency: int, body: dict[str, Any] | None = None
) -> list[httpx.Response]:
    limiter = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 10)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=strata.headers) as client:

        async def one() -> httpx.Response:
            async with limiter:
                return await client.post(f"{strata.base_url}/chat/completions", json=body or BODY)

        return list(await asyncio.gather(*(one() for _ in range(count))))


def metric(strata: StrataProcess, line_start: str) -> float:
    """The value of the first /metrics sample whose line starts with `line_start`."""
    for line in httpx.get(f"{strata.url}/metrics", headers=strata.headers).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starting with {line_start!r}")


def breaker_states(strata: StrataProcess) -> dict[str, str]:
    data = httpx.get(f"{strata.url}/admin/deployments", headers=strata.headers).json()["data"]
    return {d["target"]: d["breaker"]["state"] for d in data}


async def test_half_failing_replica_costs_clients_nothing(tmp_path: Path, mocks: list[MockBackend]) -> None:
    flaky, steady, _ = mocks
    flaky.error_rate, flaky.error_status = 0.5, 500
    strata = serve(tmp_path, [replicas(flaky, steady)])
    try:
        responses = await fire(strata, 200, 10)
        assert Counter(r.status_code for r in responses) == {200: 200}
        assert flaky.chat_attempts > 0, "the flaky replica was tried"
    finally:
        strata.stop()


async def test_hanging_replica_trips_its_breaker_then_recovers(tmp_path: Path, mocks: list[MockBackend]) -> None:
    hanging, steady, _ = mocks
    hanging.default = Reply(hang=True)
    model = replicas(
        hanging,
        steady,
        timeouts={"read_s": 0.3, "total_s": 10},
        breaker={"consecutive_failures": 2, "open_s": 5, "min_requests": 1000},  # open longer than 10 requests take
    )
    strata = serve(tmp_path, [model])
    try:
        for _ in range(20):
            if breaker_states(strata)[hanging.url] == "open":
                break
            assert (await fire(strata, 1, 1))[0].status_code == 200
        assert breaker_states(strata)[hanging.url] == "open"
        name = f"llm/127.0.0.1:{hanging.port}"
        assert metric(strata, f'strata_deployment_breaker_state{{deployment="{name}",model="llm",state="open"}}') == 1
        before = hanging.chat_attempts
        responses = await fire(strata, 10, 2)
        assert [r.status_code for r in responses] == [200] * 10
        assert hanging.chat_attempts == before, "an open breaker sends nothing to its deployment"

        hanging.default = Reply()  # the replica recovers
        deadline = time.monotonic() + 15
        while breaker_states(strata)[hanging.url] != "closed" and time.monotonic() < deadline:
            await fire(strata, 4, 2)
            await asyncio.sleep(0.2)
        assert breaker_states(strata)[hanging.url] == "closed", "half-open probes closed it again"
        before = hanging.chat_attempts
        await fire(strata, 20, 4)
        assert hanging.chat_attempts > before, "the recovered replica gets traffic again"
    finally:
        strata.stop()


async def test_all_replicas_down_are_served_by_the_fallback(tmp_path: Path, mocks: list[MockBackend]) -> None:
    fallback = mocks[0]
    fallback.default = Reply(content="from the CPU model")
    models = [
        {
            "kind": "openai",
            "name": "llm",
            "deployments": [{"base_url": "http://127.0.0.1:9/v1"}, {"base_url": "http://127.0.0.1:7/v1"}],
            "fallbacks": ["cpu"],
        },
        {"kind": "openai", "name": "cpu", "base_url": fallback.url},
    ]
    strata = serve(tmp_path, models)
    try:
        responses = await fire(strata, 30, 5)
        assert [r.status_code for r in responses] == [200] * 30
        assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {"from the CPU model"}
        assert metric(strata, 'strata_fallbacks_total{model="llm"}') == 30
    finally:
        strata.stop()


async def test_retry_budget_holds_under_a_total_outage(tmp_path: Path, mocks: list[MockBackend]) -> None:
    down = mocks[0]
    down.error_rate, down.error_status = 1.0, 503
    model = replicas(
        down,
        retry={"max_attempts": 5, "budget_ratio": 0.1, "budget_min_per_s": 0.5, "budget_window_s": 10,
               "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
        breaker={"consecutive_failures": 10_000, "failure_rate": 1.0, "min_requests": 100_000},
    )  # fmt: skip
    strata = serve(tmp_path, [model])
    try:
        responses = await fire(strata, 200, 20)
        assert {r.status_code for r in responses} == {503}
        # Without a budget: 200 x 5 = 1000 attempts. With it: the 200 requests, 10% more, and 5 spare.
        assert down.chat_attempts <= 200 + 20 + 5, down.chat_attempts
        assert all(r.json()["error"]["attempts"] for r in responses)
        retried = metric(strata, 'strata_retries_total{model="llm"}')
        assert retried == down.chat_attempts - 200  # every attempt beyond the first was a counted retry
        assert metric(strata, 'strata_retry_budget_exhausted_total{model="llm"}') > 0
    finally:
        strata.stop()


async def test_overload_is_refused_at_once_while_admitted_requests_finish(
    tmp_path: Path, mocks: list[MockBackend]
) -> None:
    slow = mocks[0]
    slow.default = Reply(latency_s=0.5)
    model = replicas(slow, admission={"max_in_flight": 2, "max_queue": 2, "max_queue_wait_s": 5})
    strata = serve(tmp_path, [model])
    try:
        finished: list[tuple[int, float]] = []

        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=30, limits=limits, headers=strata.headers) as client:

            async def one() -> httpx.Response:
                response = await client.post(f"{strata.base_url}/chat/completions", json=BODY)
                finished.append((response.status_code, time.monotonic()))
                return response

            responses = await asyncio.gather(*(one() for _ in range(40)))  # 10x what fits (2 + 2 queued)
        codes = Counter(r.status_code for r in responses)
        assert codes[200] == 4 and codes[503] == 36, codes
        refused = [r for r in responses if r.status_code == 503]
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert {r.json()["error"]["code"] for r in refused} == {"overloaded"}
        first_success = min(t for code, t in finished if code == 200)
        assert all(t < first_success for code, t in finished if code == 503), "refusals came before any answer"
        assert slow.chat_attempts == 4, "refused requests never reached the backend"
        assert metric(strata, 'strata_overload_rejections_total{model="llm"}') == 36
    finally:
        strata.stop()


@pytest.mark.slow  # a soak: 2,000 requests against one overloaded server
async def test_memory_stays_bounded_under_sustained_overload(tmp_path: Path, mocks: list[MockBackend]) -> None:
    slow = mocks[0]
    slow.default = Reply(latency_s=0.2)
    model = replicas(slow, admission={"max_in_flight": 4, "max_queue": 8, "max_queue_wait_s": 1})
    strata = serve(tmp_path, [model])
    try:
        await fire(strata, 200, 100)
        baseline = rss_mib(strata)
        for _ in range(3):
            responses = await fire(strata, 600, 200)
            assert Counter(r.status_code for r in responses).keys() <= {200, 503}
        assert rss_mib(strata) - baseline < 60, "memory grew with the offered load"
    finally:
        strata.stop()


async def test_sigterm_under_load_lets_in_flight_streams_finish(tmp_path: Path, mocks: list[MockBackend]) -> None:
    backend = mocks[0]
    backend.default = Reply(content=" ".join(["w"] * 20), chunk_delay_s=0.05)
    strata = serve(tmp_path, [replicas(backend)], drain_delay_s=0.5, shutdown_grace_s=20)
    body = {**BODY, "stream": True}
    async with httpx.AsyncClient(timeout=30, headers=strata.headers) as client:

        async def stream() -> bytes:
            async with client.stream("POST", f"{strata.base_url}/chat/completions", json=body) as response:
                return b"".join([chunk async for chunk in response.aiter_bytes()])

        tasks = [asyncio.create_task(stream()) for _ in range(20)]
        while backend.in_flight < 20:
            await asyncio.sleep(0.02)
        strata.signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    assert all(r.endswith(b"data: [DONE]\n\n") for r in results)
    assert strata.process is not None and strata.process.wait(30) == 0


def rss_mib(strata: StrataProcess) -> float:
    assert strata.process is not None
    for line in Path(f"/proc/{strata.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
