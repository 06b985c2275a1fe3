"""`server.workers: N`: N worker processes serve one port, under the `strata serve` process as supervisor.

One Python process runs on one core; a gateway machine has several. The supervisor does, once, what must
happen once per machine, and then starts the workers (like gunicorn's arbiter and uvicorn's `--workers`):

- migrates the database and creates the first admin key (printed once) before any worker starts;
- launches each model server Strata runs itself (the embedded llama.cpp, vLLM) and supervises it; the
  workers attach to it (`LaunchedDeployment.attach`) instead of launching one each;
- without Redis, keeps the rate-limit, breaker and budget state the workers share (`machine_state.py`); with
  `redis_url`, Redis does that for the workers as for replicas;
- starts N workers by `spawn` (a fresh interpreter: nothing of the supervisor's event loop or threads is
  inherited), restarts one that dies (with backoff), passes SIGHUP on (each worker reloads its configuration),
  and on SIGTERM or SIGINT has every worker drain as a lone server does (server.drain_delay_s,
  shutdown_grace_s) and waits for them.

Each worker binds the port itself with SO_REUSEPORT: the kernel spreads new connections over the listening
workers evenly (a shared accept queue lets one busy process take most), and a worker being restarted simply
gets none. The port was checked free before (`startup.preflight`), so no other program shares it unnoticed.
Runs are claimed through the database's lease (runs.py): workers of one machine are replicas like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from pathlib import Path

import structlog

from strata.compute.parent_death import die_with_parent
from strata.config import EmbeddedModelConfig, StrataConfig
from strata.resilience.breaker import MemoryBreakerStore
from strata.resilience.retry import backoff
from strata.serving.launched import Endpoint, LaunchedDeployment
from strata.serving.usage import ApproximateTokenCounter

log = structlog.get_logger("strata.workers")
MAX_DEFAULT_WORKERS = 4
WATCH_INTERVAL_S = 0.2
STEADY_S = 30.0  # a worker that lived this long died of something else than a broken start: restart at once
STOP_KILL_AFTER_S = 10.0  # after the drain and grace a worker may take: then SIGKILL
REAP_FOR_S = 10.0  # after a worker died: how long its orphans are looked for
REAP_ROUNDS = 20  # at the end: rounds of 0.1 s at most


def usable_cores() -> int:
    """The cores this process may run on, and no more than its cgroup's CPU quota (a container's CPU limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def _cgroup_cpu_quota() -> float | None:
    """cgroup v2 `cpu.max` ("max 100000" or "200000 100000"), else v1's cfs quota and period; None: no limit."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    return None


def default_workers(config: StrataConfig) -> int:
    """min(cores, 4), less one core for an embedded model (its llama.cpp threads run on this machine)."""
    count = min(usable_cores(), MAX_DEFAULT_WORKERS)
    if any(isinstance(model, EmbeddedModelConfig) for model in config.models):
        count -= 1
    return max(1, count)


def worker_count(config: StrataConfig) -> int:
    return config.server.workers or default_workers(config)


@dataclass(frozen=True)
class WorkerShare:
    """What a worker is handed by its supervisor."""

    index: int
    count: int
    state_path: Path | None  # the supervisor's state (no Redis), machine_state.py
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # deployment name -> the launched server
    announce: bool = False  # say when Strata listens and is ready: the first worker, on its first start


#: The worker's body, `(config, config_path, share)`: a module-level function (it is pickled to the child).
WorkerTarget = Callable[[StrataConfig, Path | None, WorkerShare], None]


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """The worker's own listening socket on the shared port (uvicorn listens on it with its backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


UNIX_PATH_MAX = 100  # sun_path holds 108 bytes on Linux; a little to spare


def state_socket_path(data_dir: Path) -> Path:
    """In the data directory (0700), or in a private temporary one when that path is too long for a socket."""
    path = data_dir.absolute() / "run" / f"state-{os.getpid()}.sock"
    if len(str(path)) > UNIX_PATH_MAX:
        path = Path(tempfile.mkdtemp(prefix="strata-")) / "state.sock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of this process's descendants come to it rather than to init (Linux), so it can stop them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _worker_main(target: WorkerTarget, config: StrataConfig, config_path: Path | None, share: WorkerShare) -> None:
    die_with_parent()  # a supervisor killed with -9 takes its workers with it
    if os.getppid() == 1:
        return
    target(config, config_path, share)


@dataclass
class _Worker:
    index: int
    process: SpawnProcess
    started: float
    failures: int = 0


class Supervisor:
    def __init__(
        self,
        config: StrataConfig,
        config_path: Path | None,
        count: int,
        target: WorkerTarget,
        announce_admin_key: Callable[[str], None],
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        self.target = target
        self.announce_admin_key = announce_admin_key
        self.workers: list[_Worker] = []
        self._context = multiprocessing.get_context("spawn")
        self._stopping = asyncio.Event()
        self._failed_start = False
        self._share: WorkerShare | None = None
        self._launched_now: list[LaunchedDeployment] = []

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status (STARTUP_FAILED when a worker cannot start at all)."""
        from strata.machine_state import MachineStateServer
        from strata.startup import STARTUP_FAILED, describe_failure

        become_subreaper()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        loop.add_signal_handler(signal.SIGHUP, self._signal_workers, signal.SIGHUP)  # each reloads its config
        try:
            await self._prepare_database()
        except Exception as exc:  # one line, as a lone server says it (startup.quiet_startup_failure)
            log.debug("start-up failed", exc_info=True)
            sys.stderr.write(f"cannot start: {describe_failure(exc)}\n")
            return STARTUP_FAILED
        launched = self._launched_now = self._launched()  # a model that cannot run here stops the start now
        state = None
        if self.config.redis_url is None:
            state = MachineStateServer(state_socket_path(Path(self.config.data_dir)))
            await state.start()
        try:
            endpoints = {deployment.name: deployment.share() for deployment in launched}
            for deployment in launched:
                await deployment.start()
            self._share = WorkerShare(0, self.count, state.path if state else None, endpoints)
            for index in range(self.count):
                self.workers.append(self._spawn(index))
            log.info("workers started", supervisor=os.getpid(), workers=[w.process.pid for w in self.workers])
            await self._watch()
            await self._stop_workers()
        finally:
            for deployment in launched:
                await deployment.stop(grace_s=10.0)
            if state is not None:
                await state.stop()
        return STARTUP_FAILED if self._failed_start else 0

    async def _prepare_database(self) -> None:
        """Migrations and the first admin key, once, before any worker: N workers would race for both."""
        from strata.security.admin_key import ensure_admin_key
        from strata.security.audit_log import AuditLog
        from strata.security.encryption import load_keyring
        from strata.store.audit import AuditStore
        from strata.store.database import Database
        from strata.store.keys import KeyStore

        keyring = load_keyring(self.config, os.environ)
        db = Database(self.config.effective_database_url, keyring=keyring.keyring)
        try:
            await db.upgrade()
            audit = AuditLog(AuditStore(db))
            await audit.start()
            try:
                await ensure_admin_key(KeyStore(db), audit, os.environ, self.announce_admin_key)
            finally:
                await audit.stop()
        finally:
            await db.dispose()

    def _launched(self) -> list[LaunchedDeployment]:
        from strata.serving.router import build_pool

        data_dir = Path(self.config.data_dir)
        store, counter = MemoryBreakerStore(), ApproximateTokenCounter()
        pools = [build_pool(model, data_dir, store, counter) for model in self.config.models]
        return [d for pool in pools for d in pool.deployments if isinstance(d, LaunchedDeployment)]

    def _spawn(self, index: int, failures: int = 0) -> _Worker:
        assert self._share is not None
        first = not self.workers  # the first start of all: worker 0 tells the operator
        share = WorkerShare(index, self.count, self._share.state_path, self._share.endpoints, first and index == 0)
        process = self._context.Process(
            target=_worker_main,
            args=(self.target, self.config, self.config_path, share),
            name=f"strata-worker-{index}",
        )
        process.start()
        return _Worker(index, process, time.monotonic(), failures)

    async def _watch(self) -> None:
        from strata.startup import STARTUP_FAILED

        reap_until = 0.0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), WATCH_INTERVAL_S)
            if time.monotonic() < reap_until:  # a dead worker's processes come up to the supervisor one by one
                self._reap_orphans()
            for position, worker in enumerate(self.workers):
                code = worker.process.exitcode
                if code is None or self._stopping.is_set():
                    continue
                if code == STARTUP_FAILED:  # the app cannot start: every restart would fail the same way
                    log.error("a worker could not start; stopping", worker=worker.index, pid=worker.process.pid)
                    self._failed_start = True
                    self._stopping.set()
                    break
                steady = time.monotonic() - worker.started >= STEADY_S
                failures = 1 if steady else worker.failures + 1
                delay = 0.0 if steady else backoff(failures, 0.5, 10.0, jitter=0)
                log.warning("worker exited; restarting", worker=worker.index, pid=worker.process.pid,
                            returncode=code, restart_in_s=delay)  # fmt: skip
                worker.process.join(0)
                reap_until = time.monotonic() + REAP_FOR_S
                if delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    if self._stopping.is_set():
                        break
                self.workers[position] = self._spawn(worker.index, failures)

    def _reap_orphans(self) -> int:
        """A worker killed outright leaves its own children (the CPU pool's processes) behind; as the subreaper,
        the supervisor inherits them: stop every child that is not a worker, a model server or multiprocessing's
        resource tracker."""
        from multiprocessing import resource_tracker

        keep = {w.process.pid for w in self.workers} | {d.supervisor.pid for d in self._launched_now}
        keep.add(getattr(resource_tracker._resource_tracker, "_pid", None))
        orphans = [pid for pid in children(os.getpid()) if pid not in keep]
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        return len(orphans)

    def _stop(self) -> None:
        """The first signal drains the workers (SIGTERM: a Ctrl-C reached them already, from the terminal); a
        second one is passed on as SIGINT, which makes a draining worker stop at once."""
        if self._stopping.is_set():
            self._signal_workers(signal.SIGINT)
            return
        self._stopping.set()

    def _signal_workers(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process.exitcode is None and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, sig)

    async def _stop_workers(self) -> None:
        """Pass the signal on and wait for every worker's drain; kill what outlives drain, grace and a margin."""
        self._signal_workers(signal.SIGTERM)
        server = self.config.server
        deadline = time.monotonic() + server.drain_delay_s + server.shutdown_grace_s + STOP_KILL_AFTER_S
        for worker in self.workers:  # joined in a thread: the loop goes on answering the workers' state calls
            await asyncio.to_thread(worker.process.join, max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            if worker.process.exitcode is None:
                log.warning("worker outlived its drain; killing", worker=worker.index, pid=worker.process.pid)
                worker.process.kill()
            worker.process.join(5)
        # What a killed worker had started would outlive the supervisor under init. Each generation reaches the
        # supervisor only once the one above it is gone: reap until none is left.
        for _ in range(REAP_ROUNDS):
            if not self._reap_orphans():
                break
            await asyncio.sleep(0.1)
        log.info("workers stopped", codes=[w.process.exitcode for w in self.workers])


def run_workers(
    config: StrataConfig,
    config_path: Path | None,
    count: int,
    target: WorkerTarget,
    announce_admin_key: Callable[[str], None],
) -> int:
    return asyncio.run(Supervisor(config, config_path, count, target, announce_admin_key).run())
