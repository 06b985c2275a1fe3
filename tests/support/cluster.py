"""A Strata cluster for tests: N `strata serve` replicas on one PostgreSQL database and one Redis, behind a
real HAProxy that health-checks /readyz; and a load generator that keeps every request's outcome and latency.

Balancer policy (`HAPROXY_CONFIG`): round robin over the replicas that answer /readyz 200 (checked every
200 ms, out after 2 failures, back after 2 passes). A request whose connection could not be made is sent to
another replica (`retry-on conn-failure` + `option redispatch`): nothing was sent, so even a POST is safe to
send again. A request that got no response (`empty-response`: the replica died with it) is sent again only
when it is a GET or HEAD: a POST may have been acted on, and retrying a run creation or a chat would do it
twice. A rolling restart must fail nothing without any retry; Strata's drain (/readyz 503 while it still
serves, then in-flight requests finish) is what makes it so.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.strata_process import ADMIN_KEY, StrataProcess, start_listening

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CHECK_INTERVAL_MS = 200
WAIT_S = 30.0  # bound on every wait for the balancer or a replica to converge
# Bound on a replica's start: three start at once, and on 2 cores that other test runs keep busy each is slow.
START_S = 180.0

HAPROXY_CONFIG = """\
global
    stats socket {socket} mode 600 level admin
    maxconn 1000

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    timeout queue 10s
    retries 3
    retry-on conn-failure empty-response
    option redispatch 1
    default-server check inter {interval}ms fall 2 rise 2

frontend strata_in
    bind 127.0.0.1:{port}
    default_backend strata

backend strata
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    http-request disable-l7-retry unless METH_GET || METH_HEAD
{servers}
"""


def haproxy_binary() -> str | None:
    """HAProxy on this machine (Debian's `haproxy`; scripts/ensure_system_deps.py installs it)."""
    return shutil.which("haproxy")


def redis_database(url: str = REDIS_URL) -> str:
    """The Redis URL on a database of this process's own (1 to 15): a cluster's rate-limit counters stay its own."""
    base = url.rsplit("/", 1)[0]
    return f"{base}/{1 + os.getpid() % 15}"


class Balancer:
    """HAProxy in front of `ports`, as servers r0, r1, ...; its runtime API answers on a Unix socket."""

    def __init__(self, workdir: Path, ports: list[int]) -> None:
        self.workdir = workdir
        self.ports = list(ports)
        self.socket_path = workdir / "haproxy.sock"
        self.log_path = workdir / "haproxy.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self, port: int) -> list[str]:
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(self.ports))
        text = HAPROXY_CONFIG.format(socket=self.socket_path, interval=CHECK_INTERVAL_MS, port=port, servers=servers)
        path = self.workdir / "haproxy.cfg"
        path.write_text(text)
        binary = haproxy_binary()
        assert binary is not None
        return [binary, "-db", "-f", str(path)]

    def start(self) -> Balancer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process, self.port = start_listening(self._command, stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def admin(self, command: str) -> str:
        """One command on HAProxy's runtime API."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it: "UP", "DOWN", "UP 1/2" (rising), ..."""
        rows = csv.DictReader(io.StringIO(self.admin("show stat").lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "strata" and row["svname"][0] == "r"}

    def move(self, index: int, port: int) -> None:
        """Server r<index> now listens on `port` (a restarted replica had to take another one)."""
        self.ports[index] = port
        answer = self.admin(f"set server strata/r{index} addr 127.0.0.1 port {port}")
        assert "changed" in answer or "no need" in answer, answer

    def wait_state(self, index: int, state: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while (seen := self.states().get(f"r{index}")) != state:
            if time.monotonic() > deadline:
                raise AssertionError(f"HAProxy did not see r{index} {state} within {WAIT_S}s: {seen}")
            time.sleep(0.05)


class Cluster:
    """`replicas` Strata processes sharing one config (and so one database, Redis and encryption key),
    and the balancer in front of them."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str], replicas: int = 3) -> None:
        # Replicas sharing a database share its encryption key (Strata will not make one up).
        env = {"STRATA_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(), **env}
        self.replicas = [StrataProcess(workdir / f"replica-{i}", config, env=env) for i in range(replicas)]
        self.balancer = Balancer(workdir / "haproxy", [r.port for r in self.replicas])
        self.headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    @property
    def url(self) -> str:
        return self.balancer.url

    def start(self) -> Cluster:
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda replica: replica.start(timeout_s=START_S), self.replicas))
        self.balancer.ports = [r.port for r in self.replicas]
        self.balancer.start()
        for index in range(len(self.replicas)):
            self.balancer.wait_state(index, "UP")
        return self

    def stop(self) -> list[int]:
        """Stops everything; each replica's exit status."""
        self.balancer.stop()
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            return list(pool.map(lambda replica: replica.stop(), self.replicas))

    def restart(self, index: int) -> None:
        """Start replica `index` again (on its port if it is free) and wait until the balancer sends it traffic."""
        replica = self.replicas[index]
        replica.start(timeout_s=START_S)
        if replica.port != self.balancer.ports[index]:
            self.balancer.move(index, replica.port)
        self.balancer.wait_state(index, "UP")

    def kill(self, index: int) -> None:
        """kill -9 replica `index` (and its CPU pool: see StrataProcess.kill)."""
        self.replicas[index].kill()

    def logs(self) -> str:
        return "\n".join(f"--- replica {i} ---\n{r.logs()[-4000:]}" for i, r in enumerate(self.replicas))


@dataclass(frozen=True)
class Outcome:
    """One request as its client saw it."""

    kind: str
    ok: bool
    latency_s: float
    problem: str | None = None


class Failed(Exception):
    """The response came but was wrong (status, content); the message says how."""


@dataclass
class Load:
    """Client threads, each repeating one action against `base_url` until `stop`; every request is measured."""

    base_url: str
    headers: dict[str, str]
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def measure(self, kind: str, call: Callable[[], Any]) -> Any:
        """Run one request (`call` raises Failed or httpx.HTTPError when it went wrong); None when it failed."""
        started = time.perf_counter()
        result, problem = None, None
        try:
            result = call()
        except Failed as exc:
            problem = str(exc)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.outcomes.append(Outcome(kind, problem is None, time.perf_counter() - started, problem))
        return result

    def clients(self, count: int, action: Callable[[Load, httpx.Client, int], None]) -> None:
        """Start `count` threads that call `action(load, client, n)` with n = 0, 1, 2, ... until stopped."""
        for _ in range(count):
            thread = threading.Thread(target=self._repeat, args=(action,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _repeat(self, action: Callable[[Load, httpx.Client, int], None]) -> None:
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                action(self, client, n)
                n += 1

    def stop(self) -> None:
        """Stop starting new actions and wait for the ones under way."""
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        try:
            yield self
        finally:
            self.stop()

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def report(self) -> str:
        """Requests, failures and latency percentiles per kind of request, one line each."""
        lines = []
        kinds = sorted({o.kind for o in self.outcomes})
        for kind in [*kinds, "all"]:
            chosen = [o for o in self.outcomes if kind in ("all", o.kind)]
            if not chosen:
                continue
            latencies = sorted(o.latency_s * 1000 for o in chosen)
            cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
            failed = sum(not o.ok for o in chosen)
            lines.append(
                f"{kind:<14} requests {len(chosen):>5}  failures {failed:>3}  "
                f"p50 {cuts[49]:7.1f} ms  p99 {cuts[98]:7.1f} ms  max {latencies[-1]:7.1f} ms"
            )
        problems = sorted({o.problem for o in self.failures() if o.problem})
        lines += [f"  failure: {problem[:200]}" for problem in problems[:5]]
        return "\n".join(lines)
