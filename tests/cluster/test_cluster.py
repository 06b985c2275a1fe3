"""Three `strata serve` replicas on one PostgreSQL database and one Redis, behind HAProxy health-checking /readyz,
under steady chat (plain and streamed) and agent-run load: what a production deployment must survive.

One cluster serves the whole module (starting three replicas is most of the cost); each test measures its own
load and reports it (see conftest.py). An agent run calls one tool, which appends its idempotency key to a
shared log: "no tool call lost" is every run's call in the log, under the key of that run's call.
"""

from __future__ import annotations

import collections
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.cluster import Cluster, Failed, Load, haproxy_binary, redis_database
from tests.support.databases import postgres_database
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.runs import ENDED
from tests.support.strata_process import StrataProcess

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        haproxy_binary() is None,
        reason="HAProxy is not installed (Debian package haproxy; scripts/ensure_system_deps.py installs it as root)",
    ),
    # Three replicas started at once, and each restarted in turn: minutes when other test runs load the machine.
    pytest.mark.timeout(600),
]

LOOPBACK = {"allow_networks": ["127.0.0.0/8"]}
RUN_WAIT_S = 40.0  # bound on one run's end, across a replica's restart or death
ANSWER = "recorded, done"
FRESH = "from the model deployed last"


@pytest.fixture(scope="module")
def mocks() -> Iterator[tuple[MockBackend, MockBackend, MockBackend]]:
    """The chat model echoes (each answer is checked against its question); the agent's model asks for one tool
    call, then answers once it sees the result. Both take a little while, so requests and runs are in flight.
    The third is a model deployed while the cluster runs."""
    with MockBackend() as chat, MockBackend() as agent, MockBackend() as fresh:
        fresh.default = Reply(content=FRESH)
        chat.default = Reply(echo=True, latency_s=0.05, chunk_delay_s=0.05)
        agent.default = Reply(
            tool_calls=[ToolCallSpec("record", {"label": "work"}, id="only")], answer_after_tool=ANSWER, latency_s=0.3
        )
        yield chat, agent, fresh


@pytest.fixture(scope="module")
def effects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("effects") / "effects.log"


@pytest.fixture(scope="module")
def cluster(
    mocks: tuple[MockBackend, MockBackend, MockBackend], effects: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    chat, agent, _ = mocks
    with postgres_database() as database_url:
        config = {
            "models": [
                {"kind": "openai", "name": "chat", "base_url": chat.url},
                {"kind": "openai", "name": "agent-model", "base_url": agent.url},
            ],
            "database_url": database_url,
            "redis_url": redis_database(),
            "tools": {"functions": [{"name": "record", "import_path": "tests.support.agent_tools:record_call"}]},
            "agents": [{"name": "clerk", "model": "agent-model", "tools": ["record"]}],
            "runs": {"workers": 4, "poll_s": 0.1, "lease_s": 2},
            # drain_delay_s: well over HAProxy's 2 checks 200 ms apart, on a busy machine.
            "server": {"health_interval_s": 0.5, "drain_delay_s": 2.5, "shutdown_grace_s": 10},
            # Polling once a minute: only Redis can carry a deploy to every replica within a test.
            "deploy": {"endpoints": LOOPBACK, "sync_interval_s": 60},
        }
        cluster = Cluster(tmp_path_factory.mktemp("cluster"), config, {"TEST_SIDE_EFFECTS_LOG": str(effects)})
        try:
            yield cluster.start()
        finally:
            codes = cluster.stop()
        assert codes == [0, 0, 0], f"replicas exited {codes}:\n{cluster.logs()}"


def chat(load: Load, client: httpx.Client, n: int) -> None:
    text = f"ping {n} {uuid.uuid4().hex}"

    def call() -> None:
        body = {"model": "chat", "messages": [{"role": "user", "content": text}]}
        response = client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise Failed(f"chat: {response.status_code} {response.text[:200]}")
        if (answer := response.json()["choices"][0]["message"]["content"]) != text:
            raise Failed(f"chat: answered {answer!r} to {text!r}")

    load.measure("chat", call)


def chat_stream(kind: str, words: int) -> Callable[[Load, httpx.Client, int], None]:
    """A streamed chat of about `words` chunks, 50 ms apart: every chunk must arrive, then [DONE]."""

    def action(load: Load, client: httpx.Client, n: int) -> None:
        text = " ".join([f"stream {n} {uuid.uuid4().hex}", *["word"] * (words - 3)])

        def call() -> None:
            body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": text}]}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise Failed(f"{kind}: {response.status_code} {response.read()[:200]!r}")
                pieces, done = [], False
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        raise Failed(f"{kind}: error event {event['error']}")
                    pieces += [c["delta"].get("content") or "" for c in event.get("choices", [])]
            if not done or "".join(pieces) != text:
                raise Failed(f"{kind}: cut short (done={done}) after {len(pieces)} chunks")

        load.measure(kind, call)

    return action


def agent_runs(
    runs: dict[str, dict[str, Any] | None], create_attempts: int
) -> Callable[[Load, httpx.Client, int], None]:
    """Start a background run and follow it to its end (kept in `runs`). A creation that got no answer is sent
    again, up to `create_attempts` times, under the same Idempotency-Key: at most one run is made of it."""

    def action(load: Load, client: httpx.Client, n: int) -> None:
        key = uuid.uuid4().hex

        def create() -> str:
            body = {"input": f"job {n}", "mode": "background"}
            response = client.post("/v1/agents/clerk/runs", json=body, headers={"Idempotency-Key": key})
            if response.status_code not in (200, 202):
                raise Failed(f"run create: {response.status_code} {response.text[:200]}")
            return str(response.json()["id"])

        for _ in range(create_attempts):
            if run_id := load.measure("run.create", create):
                break
            time.sleep(0.2)
        else:
            return

        def read() -> dict[str, Any]:
            response = client.get(f"/v1/runs/{run_id}")
            if response.status_code != 200:
                raise Failed(f"run read: {response.status_code} {response.text[:200]}")
            return dict(response.json())

        runs[run_id] = None
        deadline = time.monotonic() + RUN_WAIT_S
        while time.monotonic() < deadline:
            if (run := load.measure("run.read", read)) and run["status"] in ENDED:
                runs[run_id] = run
                return
            time.sleep(0.1)

    return action


def tool_calls(effects: Path, run_ids: list[str]) -> collections.Counter[str]:
    """How often each of these runs' tool calls executed, by idempotency key."""
    wanted = set(run_ids)
    keys = (line.split()[0] for line in effects.read_text().splitlines())
    return collections.Counter(key for key in keys if key.split(":", 1)[0] in wanted)


def assert_every_run_completed_and_no_tool_call_lost(runs: dict[str, dict[str, Any] | None], effects: Path) -> None:
    assert runs, "the load started runs"
    unfinished = {
        run_id: run and run["status"] for run_id, run in runs.items() if not run or run["status"] != "completed"
    }
    assert not unfinished, f"runs that did not complete: {unfinished}"
    assert {run["output"] for run in runs.values() if run} == {ANSWER}
    calls = tool_calls(effects, list(runs))
    # Exactly one call per run, under its run's key. A call cut off by a stop after it ran but before it was
    # journaled runs again under the same key (a real tool deduplicates on it): counted, not a second call.
    assert sorted(calls) == sorted(f"{run_id}:0:only" for run_id in runs)


def measured(load: Load, runs: dict[str, dict[str, Any] | None], effects: Path) -> str:
    calls = tool_calls(effects, list(runs))
    resumed = sum(1 for run in runs.values() if run and run["attempts"] > 1)
    repeats = sum(count - 1 for count in calls.values())
    return (
        f"{load.report()}\nruns {len(runs)} (resumed on another replica {resumed}), tool calls {len(calls)}, "
        f"re-executed under the same key {repeats}"
    )


def status(replica: StrataProcess, key: str) -> int:
    """What `key` gets from this replica itself (not through the balancer)."""
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.get(f"{replica.url}/v1/models", headers=headers, timeout=10).status_code


def test_a_key_revoked_through_the_balancer_stops_working_on_every_replica(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.url, headers=cluster.headers, timeout=30) as admin:
        made = admin.post("/admin/keys", json={"name": "doomed", "role": "user"}).json()
        assert [status(r, made["key"]) for r in cluster.replicas] == [200, 200, 200]  # each has it cached now
        assert admin.post(f"/admin/keys/{made['id']}/revoke").status_code == 200
    deadline = time.monotonic() + 10
    while (codes := [status(r, made["key"]) for r in cluster.replicas]) != [401, 401, 401]:
        assert time.monotonic() < deadline, f"the revoked key still works somewhere: {codes}"
        time.sleep(0.1)


def test_a_keys_rate_limit_is_one_limit_across_the_replicas(cluster: Cluster) -> None:
    # The window is a fixed minute with a per-key phase: a key whose window ends soon is set aside for another.
    rpm = 6
    with httpx.Client(base_url=cluster.url, headers=cluster.headers, timeout=30) as admin:
        for _ in range(10):
            key = admin.post("/admin/keys", json={"name": "limited", "role": "user", "rpm": rpm}).json()["key"]
            first = httpx.get(f"{cluster.replicas[0].url}/v1/models", headers={"Authorization": f"Bearer {key}"})
            reset = first.headers["x-ratelimit-reset-requests"]  # "250ms", "12s", "1m0s"
            if not reset.endswith("ms") and ("m" in reset or int(reset.removesuffix("s")) >= 20):
                break
        else:
            raise AssertionError("no key with 20 s left in its rate-limit window in 10 tries")
    codes = [first.status_code] + [status(cluster.replicas[i % 3], key) for i in range(1, 3 * rpm)]
    # Each replica alone would have let 6 through: 18 in all.
    assert collections.Counter(codes) == {200: rpm, 429: 2 * rpm}, codes


def test_a_model_deployed_through_the_balancer_reaches_every_replica(
    cluster: Cluster, mocks: tuple[MockBackend, MockBackend, MockBackend]
) -> None:
    with httpx.Client(base_url=cluster.url, headers=cluster.headers, timeout=30) as admin:
        deployed = admin.post("/admin/models/fresh/deploy", json={"kind": "openai", "base_url": mocks[2].url})
    assert deployed.status_code == 200, deployed.text
    # Replicas poll for deploys once a minute here: only the Redis notification can bring it in time.
    body = {"model": "fresh", "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.monotonic() + 20
    waiting = list(cluster.replicas)
    while waiting:
        answers = [
            httpx.post(f"{r.base_url}/chat/completions", json=body, headers=r.headers, timeout=10) for r in waiting
        ]
        assert all(a.json()["choices"][0]["message"]["content"] == FRESH for a in answers if a.status_code == 200)
        waiting = [r for r, a in zip(waiting, answers, strict=True) if a.status_code != 200]
        assert time.monotonic() < deadline, f"replicas on {[r.port for r in waiting]} never served the new model"
        time.sleep(0.1)


@pytest.mark.slow  # soak-style: the module takes about a minute and a half on 2 busy cores
def test_a_rolling_restart_under_load_fails_no_request(
    cluster: Cluster, effects: Path, report_load: Callable[[str], None]
) -> None:
    runs: dict[str, dict[str, Any] | None] = {}
    load = Load(cluster.url, cluster.headers)
    with load.running():
        load.clients(4, chat)
        load.clients(2, chat_stream("chat.stream", words=8))
        # Longer than the drain delay: some are still streaming when their replica closes its listener.
        load.clients(3, chat_stream("chat.long", words=70))
        load.clients(3, agent_runs(runs, create_attempts=1))
        time.sleep(2)
        for index, replica in enumerate(cluster.replicas):
            replica.signal(signal.SIGTERM)  # /readyz 503 at once; serving on for drain_delay_s; then exit
            assert replica.process is not None and replica.process.wait(30) == 0, replica.logs()[-3000:]
            cluster.restart(index)
        time.sleep(2)
    report_load(measured(load, runs, effects))
    assert not load.failures(), load.report()
    assert_every_run_completed_and_no_tool_call_lost(runs, effects)


@pytest.mark.slow
def test_a_replica_killed_mid_runs_leaves_every_run_to_the_others(
    cluster: Cluster, effects: Path, report_load: Callable[[str], None]
) -> None:
    runs: dict[str, dict[str, Any] | None] = {}
    victim = cluster.replicas[1]
    load = Load(cluster.url, cluster.headers)
    with load.running():
        load.clients(2, chat)
        load.clients(6, agent_runs(runs, create_attempts=5))
        claimed = victim.logs().count('"run claimed"')
        deadline = time.monotonic() + 20
        while victim.logs().count('"run claimed"') < claimed + 5:  # the victim is running some of them
            assert time.monotonic() < deadline, "the victim never took a run"
            time.sleep(0.1)
        cluster.kill(1)
        cluster.balancer.wait_state(1, "DOWN")
        time.sleep(4)  # the others take over the victim's runs when their leases end
        cluster.restart(1)
        time.sleep(1)
    report_load(measured(load, runs, effects))
    # Only what was in flight on the victim may fail (at most one request per client), and never a read:
    # the balancer sends those again.
    failures = load.failures()
    assert len(failures) <= 8 and not [o for o in failures if o.kind == "run.read"], load.report()
    assert_every_run_completed_and_no_tool_call_lost(runs, effects)
    resumed = [run for run in runs.values() if run and run["attempts"] > 1]
    assert resumed, "some run was cut off on the victim and finished on another replica"
