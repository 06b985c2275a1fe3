"""Keep one inference-server child process alive: launch, wait for health, restart with backoff, stop.

Shared by every launched backend (the embedded llama.cpp server now, vLLM later).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from strata.compute.parent_death import die_with_parent
from strata.resilience.retry import backoff

log = structlog.get_logger("strata.supervisor")

# Between health probes while a child starts: readiness (and `strata serve`'s cold start) waits for the next
# probe, and a probe of a server not listening yet is one refused connect.
HEALTH_POLL_S = 0.05


class ChildState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]
    log_path: Path


def free_port(host: str = "127.0.0.1", preferred: int | None = None) -> int:
    """A port nobody listens on now; `preferred` first, so a restarted child keeps its address."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port")  # pragma: no cover - binding port 0 does not fail in practice


def log_tail(path: Path, max_bytes: int = 2000) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


class ProcessSupervisor:
    def __init__(
        self,
        name: str,
        *,
        make_spec: Callable[[], LaunchSpec],
        is_healthy: Callable[[], Awaitable[bool]],
        startup_timeout_s: float,
        backoff_max_s: float,
        backoff_initial_s: float = 0.5,
    ) -> None:
        self.name = name
        self._make_spec = make_spec
        self._is_healthy = is_healthy
        self._startup_timeout_s = startup_timeout_s
        self._backoff_max_s = backoff_max_s
        self._backoff_initial_s = backoff_initial_s
        self.state = ChildState.STOPPED
        self.restarts = 0
        self.pid: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._supervise(), name=f"supervise:{self.name}")

    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self, grace_s: float = 10.0) -> None:
        self._stopping.set()
        self.state = ChildState.STOPPING
        self._ready.clear()
        await self._terminate(grace_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.state = ChildState.STOPPED

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self.state = ChildState.STARTING
            try:
                spec = self._make_spec()
                spec.log_path.parent.mkdir(parents=True, exist_ok=True)
                with spec.log_path.open("ab") as log_file:
                    self._process = await asyncio.create_subprocess_exec(
                        *spec.argv,
                        env=spec.env,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=asyncio.subprocess.STDOUT,
                        preexec_fn=die_with_parent,
                        start_new_session=True,  # a terminal's Ctrl-C reaches Strata, which stops it in order
                    )
            except Exception as exc:  # e.g. the executable is missing: a failed launch, retried with backoff
                failures += 1
                delay = backoff(failures, self._backoff_initial_s, self._backoff_max_s, jitter=0)
                self.state = ChildState.RESTARTING
                log.error("cannot launch child", child=self.name, error=f"{type(exc).__name__}: {exc}",
                          retry_in_s=delay)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                continue
            self.pid = self._process.pid
            log.info("child started", child=self.name, pid=self.pid, log_file=str(spec.log_path))
            if await self._wait_healthy(self._process):
                self.state = ChildState.READY
                self._ready.set()
                failures = 0
                log.info("child ready", child=self.name, pid=self.pid)
                returncode = await self._process.wait()
            else:
                returncode = self._process.returncode
                if returncode is None:
                    log.error("child never became healthy", child=self.name, timeout_s=self._startup_timeout_s)
                    await self._terminate(5.0)
                    returncode = self._process.returncode
            self._ready.clear()
            if self._stopping.is_set():
                return
            failures += 1
            self.restarts += 1
            delay = backoff(failures, self._backoff_initial_s, self._backoff_max_s, jitter=0)
            self.state = ChildState.RESTARTING
            log.warning(
                "child exited; restarting",
                child=self.name,
                pid=self.pid,
                returncode=returncode,
                restart_in_s=delay,
                restarts=self.restarts,
                log_tail=log_tail(spec.log_path, 600),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _wait_healthy(self, process: asyncio.subprocess.Process) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout_s
        while loop.time() < deadline:
            if process.returncode is not None:
                return False
            if await self._is_healthy():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), HEALTH_POLL_S)
        return False

    async def _terminate(self, grace_s: float) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            log.warning("child ignored SIGTERM; killing", child=self.name, pid=process.pid, grace_s=grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
