"""The processes a benchmark run needs: the mock upstream, the OTLP sink, and a real `strata serve`.

Strata runs with every production feature on:
- authentication: every request carries a `user`-role API key created through the admin API (the admin key
  comes from STRATA_ADMIN_KEY);
- rate limiting: that key has rpm/tpm limits (large enough never to refuse), so the limiter runs on every
  request (in-process: `redis_url` is unset);
- metering: usage rows and cost go through the batched usage writer (SQLite in a temporary data dir);
- metrics: Prometheus metrics are recorded on every request (`/metrics`);
- tracing: enabled, sample ratio 1.0, with OTLP/HTTP export to a local "collector": a second instance of
  `bench.mock_upstream` that answers `POST /v1/traces` with 200 and discards the spans (the local trace
  store stays on, as by default);
- logging: JSON lines at info level, to a file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from strata.workers import children

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-key-not-for-production"
MODEL = "bench-model"
CODE_AGENT = "bench-code-agent"  # the agent-step scenario's loop as code
CODE_ENTRYPOINT = "bench.code_agent:tool_loop"
GENEROUS = 2**31 - 1  # the largest rpm/tpm a key may carry: the limiter runs, never refuses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _python() -> str:
    return sys.executable


class Process:
    """A child process with a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.log_path = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def logs(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def wait_http(url: str, proc: Process, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.logs()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{proc.name} did not answer 200 on {url} within {timeout_s}s:\n{proc.logs()}")


def create_user_key(base_url: str) -> str:
    """A `user`-role key whose rpm/tpm limits make the rate limiter run on every request without refusing."""
    response = httpx.post(
        base_url + "/admin/keys",
        json={"name": "bench-user", "role": "user", "rpm": GENEROUS, "tpm": GENEROUS},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["key"])


class BenchServers:
    """Starts mock upstream, OTLP sink and Strata in a temporary directory; a context manager."""

    def __init__(
        self,
        stream_chunks: int = 100,
        stream_interval_ms: float = 20.0,
        workdir: Path | None = None,
        workers: int = 1,
    ):
        """`workers`: Strata's `server.workers` (1, one process, unless a scenario compares)."""
        self.workers = workers
        self.stream_chunks = stream_chunks
        self.stream_interval_ms = stream_interval_ms
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="strata-bench-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mock_port = free_port()
        self.collector_port = free_port()
        self.strata_port = free_port()
        self.mock: Process | None = None
        self.collector: Process | None = None
        self.strata: Process | None = None
        self.user_key = ""

    # URLs
    @property
    def mock_url(self) -> str:
        return f"http://127.0.0.1:{self.mock_port}/v1/chat/completions"

    @property
    def strata_base(self) -> str:
        return f"http://127.0.0.1:{self.strata_port}"

    @property
    def strata_url(self) -> str:
        return self.strata_base + "/v1/chat/completions"

    def config(self) -> dict[str, Any]:
        return {
            # At most 64 requests in progress (the throughput scenario's highest concurrency), so the overload
            # scenario sees requests shed rather than queued behind 256 (the default).
            "server": {
                "host": "127.0.0.1",
                "port": self.strata_port,
                "drain_delay_s": 0.0,
                "max_in_flight": 64,
                "workers": self.workers,
            },
            "models": [
                {
                    "kind": "openai",
                    "name": MODEL,
                    "base_url": f"http://127.0.0.1:{self.mock_port}/v1",
                    "max_connections": 1024,
                    # Let the streaming scenario's 1,000 streams in; the default admission limit is 64 in flight.
                    "admission": {"max_in_flight": 2048, "max_queue": 4096, "max_queue_wait_s": 5.0},
                }
            ],
            "agents": [
                {"name": "bench", "model": MODEL, "tools": []},
                # The agent-step scenario's agent: the mock's scripted model calls this side-effect-free built-in.
                {"name": "bench-agent", "model": MODEL, "tools": ["calculator"]},
                # The same loop written as code (agents as code).
                {"name": CODE_AGENT, "model": MODEL, "tools": ["calculator"], "entrypoint": CODE_ENTRYPOINT},
            ],
            "data_dir": str(self.workdir / "data"),
            "tracing": {
                "enabled": True,
                "sample_ratio": 1.0,
                "otlp_endpoint": f"http://127.0.0.1:{self.collector_port}/v1/traces",
            },
            "logging": {"format": "json", "level": "info"},
        }

    def start(self) -> BenchServers:
        py = _python()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        stream = ["--chunks", str(self.stream_chunks), "--interval-ms", str(self.stream_interval_ms)]
        self.mock = Process(
            "mock upstream",
            [py, "-m", "bench.mock_upstream", "--port", str(self.mock_port), *stream],
            self.workdir / "mock.log",
            env=env,
            cwd=REPO_ROOT,
        )
        self.collector = Process(
            "otlp sink",
            [py, "-m", "bench.mock_upstream", "--port", str(self.collector_port)],
            self.workdir / "collector.log",
            env=env,
            cwd=REPO_ROOT,
        )
        wait_http(f"http://127.0.0.1:{self.mock_port}/health", self.mock)
        wait_http(f"http://127.0.0.1:{self.collector_port}/health", self.collector)
        config_path = self.workdir / "strata.yaml"
        config_path.write_text(yaml.safe_dump(self.config()))
        strata_env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        strata_env["STRATA_ADMIN_KEY"] = ADMIN_KEY
        strata_env["PYTHONPATH"] = str(REPO_ROOT)  # the code agent's entrypoint is bench.code_agent
        self.strata = Process(
            "strata",
            [py, "-m", "strata", "serve", "--config", str(config_path)],
            self.workdir / "strata.log",
            env=strata_env,
            cwd=self.workdir,
        )
        self.started_at = time.monotonic()
        wait_http(self.strata_base + "/readyz", self.strata, timeout_s=120)
        self.ready_after_s = time.monotonic() - self.started_at
        self.user_key = create_user_key(self.strata_base)
        check = self._first_answers()
        if "x-ratelimit-limit-requests" not in check.headers:
            raise RuntimeError("rate limiting is not active on the bench key (no x-ratelimit-* headers)")
        return self

    def _first_answers(self, in_a_row: int = 8, timeout_s: float = 60.0) -> httpx.Response:
        """A chat answered `in_a_row` times running: with several workers on one port, /readyz came from one of
        them, and another may still be starting (503 `starting`)."""
        deadline, answered = time.monotonic() + timeout_s, 0
        while True:
            check = httpx.post(
                self.strata_url,
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {self.user_key}"},
                timeout=10,
            )
            if check.status_code != 503 or time.monotonic() > deadline:
                check.raise_for_status()
                answered += 1
                if answered == in_a_row:
                    return check
            else:
                answered = 0
                time.sleep(0.2)

    def stop(self) -> None:
        for proc in (self.strata, self.collector, self.mock):
            if proc is not None:
                proc.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> BenchServers:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


# /proc readings of a process (Linux)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and every process below it (a supervisor and its workers), in seconds."""
    total = 0.0
    for each in [pid, *descendants(pid)]:
        try:
            total += cpu_seconds(each)
        except OSError:  # ended meanwhile
            continue
    return total


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        below = children(todo.pop())
        found += below
        todo += below
    return found


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of `pid` in MiB (`VmHWM`: the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return 0.0
