"""`server.workers: 2` on SQLite without Redis: two processes on one port sharing one database, the first admin
key, rate limits and run claims through their supervisor, restarted when one dies, drained by one SIGTERM."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import mock_model
from tests.integration.test_vllm_launcher import fake_vllm
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess, descendants, listens_on

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    workdir = tmp_path_factory.mktemp("workers")
    launched = {  # a model server Strata launches: the supervisor launches it once, for both workers
        "kind": "vllm",
        "name": "launched",
        "model": "org/launched-model",
        "executable": str(fake_vllm(workdir)),
        "env": {"FAKE_VLLM_RECORD": str(workdir / "launches.jsonl")},
        "startup_timeout_s": 60,
    }
    config = {
        "models": [mock_model(mock_backend), launched],
        "agents": [{"name": "helper", "model": "mock-model", "system_prompt": "You are a test agent."}],
        "runs": {"lease_s": 2, "poll_s": 0.05},
        "server": {"workers": 2, "drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    process = StrataProcess(workdir, config, env={"MOCK_API_KEY": "mock-secret"})
    del process.env["STRATA_ADMIN_KEY"]  # the supervisor makes the first admin key, and prints it once
    process.start()
    wait_started(process, 2)  # /readyz answered from one worker: the other may still be starting
    process.api_key = printed_key(process.logs())
    yield process
    if process.process is not None and process.process.poll() is None:
        assert process.stop() == 0


def workers(strata: StrataProcess) -> list[int]:
    """The worker processes listening on the port (the supervisor does not listen)."""
    assert strata.process is not None
    return [pid for pid in descendants(strata.process.pid) if listens_on(pid, strata.port)]


def wait_started(strata: StrataProcess, starts: int, timeout_s: float = 60) -> None:
    """Until `starts` worker start-ups have finished (each logs "strata started" once)."""
    deadline = time.monotonic() + timeout_s
    while strata.logs().count('"strata started"') < starts:
        assert time.monotonic() < deadline, strata.logs()
        time.sleep(0.1)


def printed_key(logs: str) -> str:
    lines = logs.splitlines()
    start = next(i for i, line in enumerate(lines) if "store it now" in line)
    return next(line.strip() for line in lines[start + 1 :] if line.strip())


def serving_pids(strata: StrataProcess, pids: list[int], connections: int = 24) -> set[int]:
    """The workers holding the open client connections: the kernel spreads new connections over the port's
    sockets, one per worker."""
    clients = [strata.client(timeout=10) for _ in range(connections)]
    try:
        for client in clients:
            client.get("/v1/models").raise_for_status()  # kept alive: the connection stays open, on its worker
        inodes = established_inodes(strata.port)
        return {pid for pid in pids if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())}
    finally:
        for client in clients:
            client.close()


def established_inodes(port: int) -> set[str]:
    """The server ends of the TCP connections to `port` (state 01: established)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def test_the_first_admin_key_is_printed_once(strata: StrataProcess) -> None:
    assert strata.logs().count("created the first admin API key") == 1


def test_requests_land_on_every_worker_of_the_one_port(strata: StrataProcess) -> None:
    pids = workers(strata)
    assert len(pids) == 2
    assert serving_pids(strata, pids) == set(pids)


def test_one_model_server_serves_every_worker(strata: StrataProcess) -> None:
    assert len(strata.children("fake_vllm")) == 1  # the supervisor's child, not a worker's
    assert len((strata.workdir / "launches.jsonl").read_text().splitlines()) == 1
    chat = {**CHAT, "model": "launched"}
    clients = [strata.client(timeout=10) for _ in range(12)]  # on both workers (see above)
    try:
        answers = [client.post("/v1/chat/completions", json=chat) for client in clients]
    finally:
        for client in clients:
            client.close()
    assert [a.status_code for a in answers] == [200] * 12
    assert answers[0].json()["choices"][0]["message"]["content"] == "org/launched-model says hi"


def test_a_rate_limit_holds_across_workers(strata: StrataProcess) -> None:
    key = strata.create_key(name="limited", rpm=5)
    with strata.client(api_key=key, timeout=10) as client:
        first = client.post("/v1/chat/completions", json=CHAT)
    assert first.status_code == 200
    used = 1
    reset = first.headers["x-ratelimit-reset-requests"]  # "250ms", "12s", "1m0s": the minute's window ends then
    if reset.endswith("ms") or (not reset.startswith("1m") and int(reset.removesuffix("s")) < 10):
        time.sleep((int(reset.removesuffix("ms")) / 1000 if reset.endswith("ms") else int(reset[:-1])) + 0.5)
        used = 0  # a new window: nothing counted in it yet
    codes = []
    for _ in range(12):  # each request on a new connection: they land on both workers
        with strata.client(api_key=key, timeout=10) as client:
            codes.append(client.post("/v1/chat/completions", json=CHAT).status_code)
    assert codes.count(200) == 5 - used
    assert codes.count(429) == 12 - (5 - used)


def test_runs_are_claimed_once(strata: StrataProcess) -> None:
    def start(_: int) -> str:
        response = httpx.post(f"{strata.url}/v1/agents/helper/runs", json={"input": "hi"}, headers=strata.headers)
        response.raise_for_status()
        return str(response.json()["id"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        run_ids = list(pool.map(start, range(16)))
    runs = [wait_done(strata, run_id) for run_id in run_ids]
    assert {run["status"] for run in runs} == {"completed"}
    steps = [httpx.get(f"{strata.url}/v1/runs/{r}/steps", headers=strata.headers).json() for r in run_ids]
    assert all(len([s for s in body["data"] if s["kind"] == "model"]) == 1 for body in steps)


def wait_done(strata: StrataProcess, run_id: str, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = httpx.get(f"{strata.url}/v1/runs/{run_id}", headers=strata.headers).json()
        if run["status"] in ("completed", "failed", "cancelled"):
            return dict(run)
        time.sleep(0.05)
    raise TimeoutError(run_id)


def test_a_worker_that_dies_is_replaced(strata: StrataProcess) -> None:
    before = workers(strata)
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    codes = []
    while strata.logs().count('"strata started"') < 3:  # the first two, and the new one
        assert time.monotonic() < deadline, f"no replacement for worker {before[0]}:\n{strata.logs()}"
        # A new connection each time: any worker listening may take it. (One the killed worker's queue held at its
        # death is reset: SO_REUSEPORT gives each worker its own accept queue.)
        with contextlib.suppress(httpx.TransportError), strata.client(timeout=10) as client:
            codes.append(client.get("/v1/models").status_code)
    assert codes and set(codes) == {200}, "the new worker took connections before it could serve them"
    now = workers(strata)
    assert len(now) == 2 and before[0] not in now
    assert strata.process is not None
    deadline = time.monotonic() + 15  # what the killed worker had started (its CPU pool) is stopped too
    while left_over(strata) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left_over(strata)


def left_over(strata: StrataProcess) -> list[str]:
    """The supervisor's children other than its workers, the model server and multiprocessing's tracker."""
    assert strata.process is not None
    found = []
    for pid in descendants(strata.process.pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != strata.process.pid:
                continue
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if not any(known in command for known in ("spawn_main", "fake_vllm", "resource_tracker")):
                found.append(command)
    return found


def test_a_model_server_that_dies_is_relaunched_once_for_every_worker(strata: StrataProcess) -> None:
    [server] = strata.children("fake_vllm")
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while [server] == strata.children("fake_vllm") or not strata.children("fake_vllm"):
        assert time.monotonic() < deadline, "the model server was not relaunched"
        time.sleep(0.1)
    assert len(strata.children("fake_vllm")) == 1
    chat = {**CHAT, "model": "launched"}
    codes: list[int] = []
    while len(codes) < 8 or codes[-8:] != [200] * 8:  # both workers reach it again (fresh connections)
        assert time.monotonic() < deadline, f"the workers did not reach the relaunched server: {codes}"
        with strata.client(timeout=10) as client:
            codes.append(client.post("/v1/chat/completions", json=chat).status_code)


def test_sigterm_drains_every_worker_and_exits_cleanly(strata: StrataProcess, mock_backend: MockBackend) -> None:
    pids = workers(strata)
    mock_backend.default = Reply(content=" ".join(f"w{i}" for i in range(10)), chunk_delay_s=0.2)
    received: list[bytes] = []

    def consume() -> None:
        body = {**CHAT, "stream": True}
        with httpx.stream("POST", strata.base_url + "/chat/completions", json=body, headers=strata.headers,
                          timeout=30) as response:  # fmt: skip
            received.extend(response.iter_bytes())

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(0.5)  # the stream is flowing on one of the workers
    assert strata.stop() == 0
    reader.join(30)
    assert b"".join(received).endswith(b"data: [DONE]\n\n"), "the stream in flight was cut"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert '"unhandled error"' not in strata.logs()
