"""Observability and cost end to end, through a real `strata serve` in front of the mock backend.

What an operator sees from the outside after a known sequence of requests: the numbers on /metrics, the
cost header, /v1/usage and `strata usage` reports that add up to what was sent, budgets that stop a key (and
an agent) at the right request, webhook alerts that fire and resolve once, and log lines that a request id
ties to one trace.

The mock reports usage as scripted (`Reply.prompt_tokens`, `Reply.completion_tokens`), so every token count
and price here is exact. Each test works on models of its own, so one module-scoped server serves them all;
the alerting test starts its own, since alerts look at every request a server answers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import REPO_ROOT, StrataProcess

CHAT_ROUTE = "/v1/chat/completions"
# Prices per million tokens, per model. Each test has models of its own, so its numbers are exact.
METRICS_PRICE = (1000.0, 2000.0)
USAGE_PRICE = (3.0, 15.0)
BUDGET_PRICE = (0.0, 4000.0)  # the mock's default reply has 5 completion tokens: $0.02 a request
# Tokens and busy time together, as a self-hosted model with token prices: $1 per second of the deployment.
HOURLY_PRICE = (1000.0, 2000.0)
USD_PER_BUSY_HOUR = 3600.0


def _cost(price: tuple[float, float], prompt: int, completion: int) -> float:
    return (prompt * price[0] + completion * price[1]) * 1e-6


def _priced(mock: MockBackend, name: str, price: tuple[float, float], **extra: Any) -> dict[str, Any]:
    return mock_model(mock, name, input_usd_per_mtok=price[0], output_usd_per_mtok=price[1], **extra)


# -- the server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    workdir = tmp_path_factory.mktemp("obs-cost")
    config = {
        "models": [
            _priced(mock_backend, "metrics-model", METRICS_PRICE),
            _priced(mock_backend, "usage-model", USAGE_PRICE),
            _priced(mock_backend, "budget-model", BUDGET_PRICE),
            mock_model(mock_backend, "log-model"),
            _priced(mock_backend, "hourly-model", HOURLY_PRICE, gpu_usd_per_hour=USD_PER_BUSY_HOUR),
        ],
        "agents": [
            {"name": "helper", "model": "usage-model"},
            {"name": "capped", "model": "budget-model"},
            {"name": "logger", "model": "log-model"},
            {"name": "keyed", "model": "budget-model"},
            {"name": "hourly", "model": "hourly-model"},
        ],
        "cost": {"budgets": [{"scope": "agent", "name": "capped", "period": "day", "limit_usd": 0.05}]},
        "runs": {"poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 2},
    }
    process = StrataProcess(workdir, config, {"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs(), "a request hit an unexpected exception"


# -- helpers ---------------------------------------------------------------------------------------------


def make_key(server: StrataProcess, role: str = "user", **fields: Any) -> tuple[str, str]:
    """A new API key: (secret, key id)."""
    body = {"name": fields.pop("name", f"e2e-{role}-{uuid.uuid4().hex[:8]}"), "role": role, **fields}
    response = httpx.post(server.url + "/admin/keys", json=body, headers=server.headers, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["key"], response.json()["id"]


def chat(model: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def stream(client: httpx.Client, body: dict[str, Any]) -> str:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200, response.read()
        text = response.read().decode()
    assert text.rstrip().endswith("data: [DONE]"), text
    return text


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: StrataProcess) -> tuple[str, Samples]:
    response = server.client().get("/metrics")
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def log_lines(server: StrataProcess) -> list[dict[str, Any]]:
    lines = []
    for line in server.logs().splitlines():
        if line.startswith("{"):
            try:
                lines.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return lines


def trace_id_of(response: httpx.Response) -> str:
    parent = response.headers.get("traceparent")
    assert parent, f"no traceparent in {dict(response.headers)}"
    return parent.split("-")[1]


def next_month(now: datetime) -> datetime:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_until(
    predicate: Callable[[], bool], limit_s: float, message: str, step: Callable[[], None] | None = None
) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, message
        if step is not None:
            step()
        else:
            time.sleep(0.05)


def row(body: dict[str, Any], group: str | None) -> dict[str, Any]:
    found = [r for r in body["data"] if r["group"] == group]
    assert len(found) == 1, f"no single row for {group!r} in {body['data']}"
    return found[0]


def strata_cli(server: StrataProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "MOCK_API_KEY": "mock-secret"}
    return subprocess.run(
        [sys.executable, "-m", "strata", *args, "--config", str(server.config_path)],
        cwd=server.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- 1. metrics after a known sequence of requests -------------------------------------------------------


def test_metrics_after_a_known_sequence_of_requests(server: StrataProcess, mock_backend: MockBackend) -> None:
    marker = f"zqmarker{uuid.uuid4().hex}"
    _, before = scrape(server)
    secret, key_id = make_key(server, models=["metrics-model"])
    client = server.client(secret)

    plain = [(7, 3), (13, 4), (20, 9)]  # (prompt, completion) tokens the mock reports
    streamed = [(5, 3), (6, 2)]
    mock_backend.script(*(Reply(prompt_tokens=p, completion_tokens=c) for p, c in plain))
    for index in range(len(plain)):
        text = f"please remember {marker}" if index == 0 else "hi"
        response = client.post("/v1/chat/completions", json=chat("metrics-model", text), timeout=30)
        assert response.status_code == 200, response.text
    mock_backend.script(*(Reply(content="one two three", prompt_tokens=p, completion_tokens=c) for p, c in streamed))
    for _ in streamed:
        stream(client, chat("metrics-model", marker))

    mock_backend.default = Reply(status=500, error_message=f"upstream broke {marker}")  # every attempt fails
    failures = 2
    for _ in range(failures):
        response = client.post("/v1/chat/completions", json=chat("metrics-model"), timeout=30)
        assert response.status_code == 502, response.text
    mock_backend.default = Reply()

    limited_secret, limited_id = make_key(server, rpm=1, models=["metrics-model"])
    limited = server.client(limited_secret)
    mock_backend.script(Reply(prompt_tokens=8, completion_tokens=2))
    assert limited.post("/v1/chat/completions", json=chat("metrics-model"), timeout=30).status_code == 200
    refused = limited.post("/v1/chat/completions", json=chat("metrics-model"), timeout=30)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_requests"

    bad = server.client("sk-strata-" + "x" * 49).post("/v1/chat/completions", json=chat("metrics-model"))
    assert bad.status_code == 401
    # User text where label values come from: the model name and the path.
    assert server.client().post("/v1/chat/completions", json=chat(f"model-{marker}")).status_code == 404
    assert server.client().get(f"/v1/{marker}").status_code == 404

    text, after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    successes = len(plain) + len(streamed) + 1
    model = {"route": CHAT_ROUTE, "model": "metrics-model"}
    assert value(after, "strata_requests_total", **model, status="200") == successes
    assert value(after, "strata_requests_total", **model, status="502") == failures
    assert value(after, "strata_requests_total", **model) == successes + failures
    assert delta("strata_requests_total", route=CHAT_ROUTE, status="401") == 1
    assert delta("strata_requests_total", route=CHAT_ROUTE, status="429") == 1
    assert delta("strata_rate_limit_rejections_total", kind="requests") == 1
    assert delta("strata_requests_total", route="unmatched", status="404") == 1
    assert value(after, "strata_request_duration_seconds_count", **model) == successes + failures

    used = [*plain, *streamed, (8, 2)]
    tokens = {"gen_ai_request_model": "metrics-model"}
    assert value(after, "gen_ai_client_token_usage_sum", **tokens, gen_ai_token_type="input") == sum(p for p, _ in used)
    assert value(after, "gen_ai_client_token_usage_sum", **tokens, gen_ai_token_type="output") == sum(
        c for _, c in used
    )
    assert value(after, "gen_ai_client_token_usage_count", **tokens, gen_ai_token_type="input") == len(used)

    mine = sum(_cost(METRICS_PRICE, p, c) for p, c in [*plain, *streamed])
    assert value(after, "strata_cost_usd_total", model="metrics-model", key=key_id) == pytest.approx(mine, abs=1e-12)
    assert value(after, "strata_cost_usd_total", model="metrics-model", key=limited_id) == pytest.approx(
        _cost(METRICS_PRICE, 8, 2), abs=1e-12
    )
    assert value(after, "strata_time_to_first_token_seconds_count", model="metrics-model") == len(streamed)

    assert marker not in text, "user text became a label value"
    label_values = {v for (_, labels), _ in after.items() for _, v in labels}
    assert "other" in label_values  # the unknown model is counted, under a bounded name


# -- 2. the cost header and usage reports ----------------------------------------------------------------


def test_cost_header_and_usage_reports_add_up(server: StrataProcess, mock_backend: MockBackend) -> None:
    user_secret, user_key = make_key(server, name=f"ursula-{uuid.uuid4().hex[:6]}")
    ursula = server.client(user_secret)
    admin = server.client()
    plain = [(100, 20), (250, 40), (31, 7)]
    mock_backend.script(*(Reply(prompt_tokens=p, completion_tokens=c) for p, c in plain))
    for p, c in plain:
        response = ursula.post("/v1/chat/completions", json=chat("usage-model"), timeout=30)
        assert response.status_code == 200, response.text
        assert float(response.headers["x-strata-cost-usd"]) == pytest.approx(_cost(USAGE_PRICE, p, c), abs=1e-9)
    mock_backend.script(Reply(prompt_tokens=12, completion_tokens=6))
    stream(ursula, chat("usage-model"))
    mock_backend.script(Reply(prompt_tokens=50, completion_tokens=10))
    assert admin.post("/v1/chat/completions", json=chat("usage-model"), timeout=30).status_code == 200

    hers = [*plain, (12, 6)]
    everyone = [*hers, (50, 10)]

    def check(report: dict[str, Any], sent: list[tuple[int, int]]) -> None:
        assert report["requests"] == len(sent) and report["errors"] == 0
        assert report["prompt_tokens"] == sum(p for p, _ in sent)
        assert report["completion_tokens"] == sum(c for _, c in sent)
        assert report["cost_usd"] == pytest.approx(sum(_cost(USAGE_PRICE, p, c) for p, c in sent), abs=1e-9)

    by_model = admin.get("/v1/usage", params={"group_by": "model", "kind": "chat"})
    assert by_model.status_code == 200, by_model.text
    check(row(by_model.json(), "usage-model"), everyone)
    by_key = admin.get("/v1/usage", params={"group_by": "key", "kind": "chat"}).json()
    check(row(by_key, user_key), hers)

    own = ursula.get("/v1/usage", params={"group_by": "model"})
    assert own.status_code == 200, own.text
    assert [r["group"] for r in own.json()["data"]] == ["usage-model"]
    check(own.json()["data"][0], hers)
    check(own.json()["total"], hers)
    forbidden = ursula.get("/v1/usage", params={"user": "someone-else"})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"

    for group_by, group, sent in (("key", user_key, hers), ("model", "usage-model", everyone)):
        result = strata_cli(server, "usage", "--json", "--group-by", group_by, "--kind", "chat")
        assert result.returncode == 0, result.stderr
        check(row(orjson.loads(result.stdout), group), sent)

    # An agent run: its model step is a run_step row whose cost is the run's.
    rita_secret, _ = make_key(server, name=f"rita-{uuid.uuid4().hex[:6]}")
    rita = server.client(rita_secret)
    mock_backend.script(Reply(prompt_tokens=40, completion_tokens=8))
    run = rita.post("/v1/agents/helper/runs", json={"input": "hello"}, timeout=30)
    assert run.status_code == 200, run.text
    assert run.json()["status"] == "completed"
    assert run.json()["cost_usd"] == pytest.approx(_cost(USAGE_PRICE, 40, 8), abs=1e-8)
    steps = rita.get("/v1/usage", params={"group_by": "agent", "kind": "run_step"}).json()
    assert [r["group"] for r in steps["data"]] == ["helper"]
    step = steps["data"][0]
    assert (step["requests"], step["prompt_tokens"], step["completion_tokens"]) == (1, 40, 8)
    assert step["cost_usd"] == pytest.approx(run.json()["cost_usd"], abs=1e-8)
    chats = rita.get("/v1/usage", params={"kind": "chat"}).json()["total"]
    assert chats is None or chats["requests"] == 0  # a run's steps are not chat requests


def test_chat_calls_and_run_steps_are_priced_alike(server: StrataProcess, mock_backend: MockBackend) -> None:
    """A model priced per token and per busy hour: a chat call and a run step with the same tokens both pay
    for their tokens and for their share of the deployment's time (the mock holds each for `busy` seconds)."""
    busy, (prompt, completion) = 0.3, (40, 8)
    tokens = _cost(HOURLY_PRICE, prompt, completion)
    client = server.client()

    def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = call()
        assert response.status_code == 200, response.text
        return response, time.monotonic() - started

    def check(cost: float, elapsed: float) -> None:
        # Tokens, plus at least the time the backend took and at most the time the whole call took: $1/s.
        assert tokens + busy * 0.95 <= cost <= tokens + elapsed, (cost, tokens, elapsed)

    mock_backend.script(Reply(prompt_tokens=prompt, completion_tokens=completion, latency_s=busy))
    response, elapsed = timed(lambda: client.post(CHAT_ROUTE, json=chat("hourly-model"), timeout=30))
    check(float(response.headers["x-strata-cost-usd"]), elapsed)

    mock_backend.script(Reply(prompt_tokens=prompt, completion_tokens=completion, latency_s=busy))
    run, elapsed = timed(lambda: client.post("/v1/agents/hourly/runs", json={"input": "hello"}, timeout=30))
    assert run.json()["status"] == "completed", run.json()
    check(run.json()["cost_usd"], elapsed)

    # The reports agree: by agent, the run's step with its cost; by model, the chat call and the step.
    def reported() -> bool:
        by_agent = client.get("/v1/usage", params={"group_by": "agent", "kind": "run_step"}).json()
        return any(r["group"] == "hourly" for r in by_agent["data"])

    wait_until(reported, 10, "the run step never reached the usage report")
    by_agent = client.get("/v1/usage", params={"group_by": "agent", "kind": "run_step"}).json()
    step = row(by_agent, "hourly")
    assert step["requests"] == 1 and step["cost_usd"] == pytest.approx(run.json()["cost_usd"], abs=1e-6)
    result = strata_cli(server, "usage", "--json", "--group-by", "agent", "--kind", "run_step")
    assert result.returncode == 0, result.stderr
    assert row(orjson.loads(result.stdout), "hourly")["cost_usd"] == pytest.approx(step["cost_usd"], abs=1e-9)
    by_model = client.get("/v1/usage", params={"group_by": "model"}).json()
    assert row(by_model, "hourly-model")["requests"] == 2
    assert row(by_model, "hourly-model")["cost_usd"] >= 2 * (tokens + busy * 0.95)


# -- 3. budgets ------------------------------------------------------------------------------------------


def test_a_key_budget_stops_the_key_at_the_right_request(server: StrataProcess, mock_backend: MockBackend) -> None:
    _, before = scrape(server)
    # $0.02 a request, $0.05 a month: spent before each check $0, $0.02, $0.04 (the third crosses the limit
    # and completes), then $0.06: the fourth is refused.
    secret, key_id = make_key(server, budget_usd=0.05, models=["budget-model"])
    client = server.client(secret)
    statuses = []
    for _ in range(5):
        response = client.post("/v1/chat/completions", json=chat("budget-model"), timeout=30)
        statuses.append(response.status_code)
        if response.status_code == 200:
            assert float(response.headers["x-strata-cost-usd"]) == pytest.approx(0.02, abs=1e-9)
        else:
            refused = response
            break
    assert statuses == [200, 200, 200, 429]
    assert len(mock_backend.chat_requests()) == 3  # the refused request never reached the backend
    resets = next_month(datetime.now(UTC))
    error = refused.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "budget_exceeded"
    assert error["message"] == f"budget exceeded: key {key_id} spent $0.06 of $0.05 this month; resets {iso(resets)}"
    assert error["budget"] == {
        "scope": "key",
        "name": key_id,
        "period": "month",
        "limit_usd": 0.05,
        "spent_usd": pytest.approx(0.06, abs=1e-9),
        "resets_at": iso(resets),
    }
    retry_after = int(refused.headers["Retry-After"])
    assert abs(retry_after - (resets - datetime.now(UTC)).total_seconds()) < 60
    _, after = scrape(server)
    assert (
        value(after, "strata_budget_rejections_total", scope="key")
        - value(before, "strata_budget_rejections_total", scope="key")
        == 1
    )


def test_an_agent_budget_stops_its_runs(server: StrataProcess, mock_backend: MockBackend) -> None:
    _, before = scrape(server)
    client = server.client()
    statuses = []
    for _ in range(5):
        response = client.post("/v1/agents/capped/runs", json={"input": "go"}, timeout=30)
        statuses.append(response.status_code)
        if response.status_code != 200:
            refused = response
            break
        assert response.json()["status"] == "completed"
        assert response.json()["cost_usd"] == pytest.approx(0.02, abs=1e-8)
    assert statuses == [200, 200, 200, 429]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert error["message"] == f"budget exceeded: agent capped spent $0.06 of $0.05 this day; resets {iso(tomorrow)}"
    assert error["budget"]["scope"] == "agent" and error["budget"]["period"] == "day"
    assert int(refused.headers["Retry-After"]) <= 86_400
    # Another agent is not held back by this one's budget.
    mock_backend.script(Reply(prompt_tokens=1, completion_tokens=1))
    assert client.post("/v1/agents/helper/runs", json={"input": "go"}, timeout=30).status_code == 200
    _, after = scrape(server)
    assert (
        value(after, "strata_budget_rejections_total", scope="agent")
        - value(before, "strata_budget_rejections_total", scope="agent")
        == 1
    )


def test_a_keys_budget_counts_its_agent_runs(server: StrataProcess, mock_backend: MockBackend) -> None:
    """Run steps are charged to the key that started the run: its usage rows and its own budget."""
    secret, key_id = make_key(server, budget_usd=0.05)
    client = server.client(secret)
    statuses = []
    for _ in range(5):
        response = client.post("/v1/agents/keyed/runs", json={"input": "go"}, timeout=30)
        statuses.append(response.status_code)
        if response.status_code != 200:
            break
    assert statuses == [200, 200, 200, 429]  # $0.02 a run: the third crosses $0.05 and completes
    assert response.json()["error"]["budget"]["scope"] == "key"
    assert response.json()["error"]["budget"]["name"] == key_id
    usage = server.client().get("/v1/usage", params={"group_by": "key", "kind": "run_step"}).json()
    mine = row(usage, key_id)
    assert mine["requests"] == 3 and mine["cost_usd"] == pytest.approx(0.06, abs=1e-8)


# -- 4. webhook alerts -----------------------------------------------------------------------------------


@dataclass
class Receiver:
    url: str
    received: list[dict[str, Any]]

    def of(self, alert: str) -> list[dict[str, Any]]:
        return [body for body in list(self.received) if body.get("alert") == alert]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1, on its own event loop in a thread, recording every POST."""
    state = Receiver(url="", received=[])
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    runner: list[web.AppRunner] = []

    async def hook(request: web.Request) -> web.Response:
        state.received.append(await request.json())
        return web.Response(status=200)

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner.append(web.AppRunner(app, access_log=None))
        await runner[0].setup()
        site = web.TCPSite(runner[0], "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        state.url = f"http://127.0.0.1:{port}/hook"
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()
        loop.run_until_complete(runner[0].cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="webhook-receiver", daemon=True)
    thread.start()
    assert ready.wait(10)
    yield state
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_webhook_alerts_fire_and_resolve_once(mock_backend: MockBackend, receiver: Receiver, tmp_path: Path) -> None:
    config = {
        "models": [_priced(mock_backend, "alert-model", BUDGET_PRICE, retry={"max_attempts": 1})],
        "agents": [],
        "alerts": {
            "interval_s": 0.2,
            "webhooks": [{"url": receiver.url}],
            "rules": [
                {"name": "HighErrorRate", "kind": "error_rate", "threshold": 0.5, "window_s": 1.0, "for_s": 0.3,
                 "min_requests": 3, "severity": "critical"},
                {"name": "BudgetReached", "kind": "budget", "threshold": 1.0, "for_s": 0},
            ],
        },
        "cost": {"budgets": [{"scope": "user", "name": "spender", "period": "day", "limit_usd": 0.05,
                              "kind": "soft"}]},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 2},
    }  # fmt: skip
    process = StrataProcess(tmp_path, config, {"MOCK_API_KEY": "mock-secret"}).start()
    try:
        client = process.client()

        def send(expected: int) -> None:
            response = client.post("/v1/chat/completions", json=chat("alert-model"), timeout=30)
            assert response.status_code == expected, response.text
            time.sleep(0.03)

        mock_backend.default = Reply(status=500)
        wait_until(lambda: bool(receiver.of("HighErrorRate")), 10, "no firing alert", lambda: send(502))
        end = time.monotonic() + 1.0  # failures go on: several more evaluations while it fires
        while time.monotonic() < end:
            send(502)
        assert [b["status"] for b in receiver.of("HighErrorRate")] == ["firing"]

        mock_backend.default = Reply()
        wait_until(lambda: len(receiver.of("HighErrorRate")) > 1, 10, "the alert did not resolve", lambda: send(200))
        end = time.monotonic() + 0.8
        while time.monotonic() < end:
            send(200)
        firing, resolved = receiver.of("HighErrorRate")
        assert (firing["status"], resolved["status"]) == ("firing", "resolved")
        assert firing["labels"]["severity"] == "critical" and firing["value"] >= 0.5
        assert firing["alerts"][0]["status"] == "firing" and firing["version"] == "4"
        assert resolved["started_at"] == firing["started_at"] and resolved["ended_at"] > resolved["started_at"]

        # A soft budget: $0.02 a request, $0.05 a day. The third request crosses it; nobody is refused.
        spender = process.client(make_key(process, name="spender")[0])
        for _ in range(4):
            assert spender.post("/v1/chat/completions", json=chat("alert-model"), timeout=30).status_code == 200
        wait_until(lambda: bool(receiver.of("BudgetReached")), 5, "no budget alert")
        time.sleep(0.6)  # a few more evaluations: still one notification
        [budget] = receiver.of("BudgetReached")
        assert budget["status"] == "firing"
        labels = budget["labels"]
        assert (labels["scope"], labels["name"], labels["period"], labels["budget_kind"]) == (
            "user",
            "spender",
            "day",
            "soft",
        )
        assert budget["value"] == pytest.approx(0.06 / 0.05)
        assert "$0.06 of $0.05" in budget["summary"]
        assert [b["alert"] for b in receiver.received].count("HighErrorRate") == 2
    finally:
        mock_backend.default = Reply()
        assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


# -- 5. logs ---------------------------------------------------------------------------------------------


def test_log_lines_of_a_request_share_its_trace(server: StrataProcess, mock_backend: MockBackend) -> None:
    request_id = f"e2e-{uuid.uuid4()}"
    mock_backend.default = Reply(status=500)  # each attempt fails: retries, then the error, all logged
    response = server.client().post(
        "/v1/chat/completions", json=chat("log-model"), headers={"X-Request-ID": request_id}, timeout=30
    )
    mock_backend.default = Reply()
    assert response.status_code == 502, response.text
    assert response.headers["X-Request-ID"] == request_id
    trace_id = trace_id_of(response)
    lines = [line for line in log_lines(server) if line.get("request_id") == request_id]
    events = [line["event"] for line in lines]
    assert events.count("retrying") == 2, events  # three attempts in all
    assert "request failed" in events, events
    assert {line.get("trace_id") for line in lines} == {trace_id}
    assert all(line.get("model") == "log-model" for line in lines), lines


def test_log_lines_of_a_run_carry_its_run_id(server: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(status=500), Reply(content="fine"))  # the run's model step is retried once
    request_id = f"e2e-{uuid.uuid4()}"
    response = server.client().post(
        "/v1/agents/logger/runs", json={"input": "hi"}, headers={"X-Request-ID": request_id}, timeout=30
    )
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "completed" and run["output"] == "fine"
    assert response.headers["X-Request-ID"] == request_id
    lines = [line for line in log_lines(server) if line.get("run_id") == run["id"]]
    events = [line["event"] for line in lines]
    assert "run claimed" in events and "retrying" in events, events
    assert all(line.get("agent") == "logger" for line in lines), lines
    # The run joins the trace of the request that started it.
    trace_id = trace_id_of(response)
    outside = [line for line in lines if line.get("trace_id") != trace_id]
    assert not outside, f"log lines of run {run['id']} without its trace id {trace_id}: {outside}"
