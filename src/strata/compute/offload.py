"""A bounded process pool for CPU-bound work (document parsing, token counting) kept off the event loop.

Threads cannot help here: pure-Python parsers hold the GIL, so a parse in a thread still stalls every
request on the loop. Worker processes do not share the GIL.

Start method: `forkserver` (or `spawn` where it is missing), never `fork`. Forking copies a process
that runs an asyncio loop and several threads (the loop's executor, database drivers, OTel exporters)
while some of them may hold locks; the child inherits those locks held forever and the loop's
self-pipe and sockets shared with the parent. `forkserver` starts one clean, single-threaded server
process early, preloads the parsing modules in it, and forks each worker from that: as safe as `spawn`
but without re-importing pypdf for every worker.

Functions sent to the pool travel by reference (pickle), so they must be module-level; their
arguments and results must be picklable.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Self, TypeVar

import structlog

from strata.compute.parent_death import exit_with

log = structlog.get_logger("strata.compute")

T = TypeVar("T")

DEFAULT_MAX_QUEUED = 256
DEFAULT_TIMEOUT_S = 60.0
_NO_DEADLINE_S = 1e8  # setitimer() rejects what it cannot represent (inf); past this, no alarm is set
# Imported once in the fork server, so every forked worker starts with them loaded. The parsers are named
# on their own: `documents` imports them on first use, to keep them out of the server's own start-up.
DEFAULT_PRELOAD = (
    "strata.compute.offload",
    "strata.compute.documents",
    "strata.compute.tokens",
    "pypdf",
    "markdown_it",
)


class CpuPoolError(RuntimeError):
    """The pool could not run a job (not started, shut down, or a worker process died)."""


class CpuPoolBusy(CpuPoolError):
    """Every worker is busy and the queue is full: refuse now rather than queue without bound."""


class CpuPoolTimeout(CpuPoolError, TimeoutError):
    """A job ran (or waited) past its deadline."""


class _Deadline(BaseException):
    # A BaseException so that parsers' broad `except Exception` (pypdf has many) cannot swallow it.
    pass


class CpuPool:
    """`ProcessPoolExecutor` with a bound on queued jobs, per-job deadlines, and recovery from dead workers.

    A job holds its slot until its worker is really free, not merely until its caller stops waiting,
    so the bound counts the work the processes actually have.
    """

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        start_method: str | None = None,
        preload: Sequence[str] = DEFAULT_PRELOAD,
    ) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if max_queued < 0:
            raise ValueError("max_queued must be 0 or more")
        if start_method == "fork":
            raise ValueError("the 'fork' start method is unsafe in a process running an event loop and threads")
        # More processes than CPUs only adds switching: the work is CPU-bound. None: one per CPU.
        self.workers = min(_available_cpus(), max_workers or _available_cpus())
        self.max_queued = max_queued
        self.default_timeout_s = default_timeout_s
        self._context = multiprocessing.get_context(start_method or _default_start_method())
        self._preload = list(preload)
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()  # the slot count is released from the executor's manager thread
        self._in_flight = 0

    @property
    def start_method(self) -> str:
        return self._context.get_start_method()

    @property
    def in_flight(self) -> int:
        """Jobs running or queued right now."""
        return self._in_flight

    @property
    def capacity(self) -> int:
        return self.workers + self.max_queued

    async def start(self) -> None:
        """Create the executor and start every worker, in a thread: starting the fork server and the
        workers blocks, and must not block the loop nor delay the first real job."""
        if self._executor is not None:
            return
        if self._closed:
            raise CpuPoolError("the CPU pool was shut down")
        if self.start_method == "forkserver":
            # Only takes effect if the (process-wide) fork server is not running yet.
            self._context.set_forkserver_preload(self._preload)
        executor = self._new_executor()
        try:
            await asyncio.to_thread(_warm_up, executor, self.workers)
        except BrokenProcessPool:
            executor.shutdown(wait=False, cancel_futures=True)
            raise CpuPoolError(
                "the CPU pool's workers failed to start; a script that starts Strata must guard its "
                "entry point with `if __name__ == '__main__':` (workers import the main module)"
            ) from None
        self._executor = executor
        log.info("cpu pool started", workers=self.workers, max_queued=self.max_queued, start_method=self.start_method)

    async def shutdown(self) -> None:
        """Refuse new jobs, cancel queued ones, and wait (in a thread) for running ones to end."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    async def run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """Run `fn(*args)` in a worker process and return its result (or raise its exception).

        `timeout_s` (default: the pool's) bounds the caller's whole wait, queueing included; the
        worker also interrupts the job itself after that long of running, so a runaway parse frees
        its process. Raises `CpuPoolBusy` when full, `CpuPoolTimeout` past the deadline.
        """
        _require_module_level(fn)
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        executor = self._executor
        if executor is None:
            raise CpuPoolError("the CPU pool is shut down" if self._closed else "the CPU pool is not started")
        with self._lock:
            if self._in_flight >= self.capacity:
                raise CpuPoolBusy(
                    f"the CPU pool is full ({self.workers} workers busy, {self.max_queued} jobs queued); "
                    "try again shortly"
                )
            self._in_flight += 1
        # What loop.run_in_executor() does, in its two steps: the concurrent future is kept so that
        # the slot is released when the worker is done, not when a timed-out caller gives up.
        try:
            future = executor.submit(_call_with_deadline, fn, args, timeout)
        except BaseException as exc:
            self._release(None)
            if isinstance(exc, BrokenProcessPool):
                self._replace(executor)
                raise CpuPoolError("the CPU pool's workers died; it was restarted, try again") from None
            if isinstance(exc, RuntimeError) and self._closed:
                raise CpuPoolError("the CPU pool is shut down") from None
            raise
        future.add_done_callback(self._release)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await asyncio.wrap_future(future)
        except TimeoutError:
            if deadline.expired():  # not a TimeoutError of the job's own (the worker's deadline is one)
                raise CpuPoolTimeout(f"{_name(fn)} did not finish within {timeout:g}s") from None
            raise
        except BrokenProcessPool:
            self._replace(executor)
            raise CpuPoolError(
                f"a CPU pool worker died while running {_name(fn)} (killed, out of memory, or crashed); "
                "the pool was restarted"
            ) from None

    def _release(self, _future: Future[Any] | None) -> None:
        with self._lock:
            self._in_flight -= 1

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self._context, initializer=_worker_init, initargs=(os.getpid(),)
        )

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        # Once one worker dies, a ProcessPoolExecutor refuses everything; only a new one recovers.
        if self._executor is broken and not self._closed:
            log.warning("cpu pool worker died; replacing the pool")
            self._executor = self._new_executor()
            broken.shutdown(wait=False, cancel_futures=True)


def _available_cpus() -> int:
    """CPUs this process may use (its affinity mask, e.g. a container's cpuset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _require_module_level(fn: Callable[..., Any]) -> None:
    qualname = getattr(fn, "__qualname__", "")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(f"{qualname} cannot run in the CPU pool: only module-level functions can be pickled")


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _warm_up(executor: ProcessPoolExecutor, workers: int) -> None:
    # Workers are spawned on demand, one per submit that finds none idle: submitting `workers` jobs
    # at once starts them all.
    for future in [executor.submit(os.getpid) for _ in range(workers)]:
        future.result()


def _worker_init(owner_pid: int) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # When Strata is killed (kill -9 too) a worker would wait forever: it holds both ends of the executor's
    # job pipe, so it never sees it close, and it holds the fork server's "alive" pipe, so the fork server
    # never exits either. A worker of the fork server is not Strata's child, so it watches Strata's pid.
    exit_with(owner_pid)


def _raise_deadline(_signum: int, _frame: object) -> None:
    raise _Deadline


def _call_with_deadline(fn: Callable[..., T], args: tuple[Any, ...], timeout_s: float) -> T:
    """Runs in the worker's main thread, so SIGALRM can interrupt a runaway job and free the process."""
    if not hasattr(signal, "setitimer") or not 0 < timeout_s < _NO_DEADLINE_S:
        return fn(*args)
    previous = signal.signal(signal.SIGALRM, _raise_deadline)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(*args)
        finally:  # the alarm may still fire in here: it is one-shot, and caught just below
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        raise CpuPoolTimeout(f"{_name(fn)} was interrupted after {timeout_s:g}s") from None
    finally:
        signal.signal(signal.SIGALRM, previous)
