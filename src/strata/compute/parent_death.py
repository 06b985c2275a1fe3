"""Children that die with the process that owns them, even when it is killed with SIGKILL."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import threading

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In the child: receive `signum` when the parent dies, even by kill -9, so nothing is orphaned.

    Linux sends it when the *thread* that created the child exits: call it only in children of a process
    whose creating thread lives as long as the process (a single-threaded server, or the main thread).
    Elsewhere (no prctl) it does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def exit_with(owner_pid: int) -> None:
    """In a process that is not the owner's direct child (a fork server's): exit as soon as `owner_pid` ends.

    A pidfd turns readable when that process ends, and one refers to that process only (a reused pid
    cannot fool it); a daemon thread waits on it. Without pidfds (Linux before 5.3) it does nothing."""
    try:
        pidfd = os.pidfd_open(owner_pid)
    except ProcessLookupError:  # it ended before this process got here (a worker started late)
        os._exit(1)
    except (AttributeError, OSError):
        return

    def wait() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=wait, name="exit-with-owner", daemon=True).start()
