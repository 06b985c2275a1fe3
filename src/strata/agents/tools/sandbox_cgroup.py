"""Whole-call limits of the python sandbox: one cgroup per call, holding every process the call starts.

Per-process limits (RLIMIT_AS, RLIMIT_NPROC) alone let a call reach max_processes x memory_mb by
forking; a cgroup's memory limit counts all of its processes and the pages of its /tmp together.
cgroup v2 is preferred (memory.max, memory.swap.max, pids.max); where the memory controller sits on
a v1 hierarchy, a v1 memory group does (memory.limit_in_bytes and, with swap accounting,
memory.memsw.limit_in_bytes). The groups are children of Strata's own cgroup, so whatever limits the
operator gave Strata still hold above them. Without a writable cgroup filesystem (not root, a
read-only /sys/fs/cgroup in a container) only the per-process limits remain: mode "rlimit".

cgroup v2 forbids a group with member processes from giving controllers to its children (the
"no internal processes" rule). When Strata's cgroup has its processes in it, as most do, they are
moved into a leaf child, `strata-server`, as a systemd unit with Delegate=yes is expected to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Mode = Literal["cgroup2", "cgroup1", "rlimit"]
SERVER_LEAF = "strata-server"
_PREFIX = "strata-python-"
_STALE = re.compile(rf"^{_PREFIX}(\d+)-\d+$")
_EMPTY_TIMEOUT_S = 2.0
_calls = itertools.count(1)  # group names stay unique across tool instances of one process


@dataclass(frozen=True)
class CallGroup:
    """One call's cgroup. `procs_fd` is its cgroup.procs, open for the child to write "0" (itself)."""

    path: Path
    version: int
    procs_fd: int

    def join(self) -> None:
        """Move the calling process into the group. Runs in the forked child before it execs bwrap, so
        everything bwrap starts is born inside; only a write(2), safe between fork and exec."""
        os.write(self.procs_fd, b"0")

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return _stat(self.path / name, "oom_kill") or 0

    def peak_bytes(self) -> int | None:
        return _read_int(self.path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"))


class Cgroups:
    """Where this process can make call groups, found once at start-up. `mode` says which limit holds;
    `reason` says why there is no cgroup when mode is "rlimit"."""

    def __init__(self, mode: Mode, parent: Path | None = None, reason: str | None = None) -> None:
        self.mode: Mode = mode
        self.parent = parent
        self.reason = reason

    @classmethod
    def detect(cls, proc: Path = Path("/proc/self")) -> Cgroups:
        try:
            mounts = (proc / "mountinfo").read_text()
            memberships = (proc / "cgroup").read_text()
        except OSError as error:
            return cls("rlimit", reason=f"cannot read the cgroups of this process: {error}")
        reasons: list[str] = []
        for version in (2, 1):
            directory = own_cgroup(mounts, memberships, version)
            if directory is None:
                reasons.append(f"no cgroup v{version} memory controller for this process")
                continue
            if directory.name == SERVER_LEAF:  # moved there by an earlier start-up of this process
                directory = directory.parent
            try:
                (_prepare_v2 if version == 2 else _prepare_v1)(directory)
            except OSError as error:
                reasons.append(f"cgroup v{version} at {directory} is not usable: {error.strerror or error}")
                continue
            _remove_stale(directory)
            return cls("cgroup2" if version == 2 else "cgroup1", directory)
        return cls("rlimit", reason="; ".join(reasons))

    def create(self, memory_bytes: int, processes: int) -> CallGroup:
        """A new group capped at `memory_bytes` (and, on v2, `processes` tasks). Raises OSError."""
        assert self.parent is not None
        path = self.parent / f"{_PREFIX}{os.getpid()}-{next(_calls)}"
        path.mkdir()
        try:
            if self.mode == "cgroup2":
                _write(path / "memory.max", memory_bytes)
                _write_if_present(path / "memory.swap.max", 0)
                _write_if_present(path / "pids.max", processes)
                version = 2
            else:
                _write(path / "memory.limit_in_bytes", memory_bytes)
                _write_if_present(path / "memory.memsw.limit_in_bytes", memory_bytes)  # after the limit above
                version = 1
            procs_fd = os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise
        return CallGroup(path, version, procs_fd)

    @staticmethod
    async def remove(group: CallGroup) -> None:
        """Kill what is left in the group (nothing, once bwrap is reaped) and remove it."""
        os.close(group.procs_fd)
        deadline = time.monotonic() + _EMPTY_TIMEOUT_S
        while True:
            members = _members(group.path)
            if not members:
                break
            if not (group.version == 2 and _write_if_present(group.path / "cgroup.kill", 1)):
                for pid in members:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        while True:
            try:
                group.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as error:  # EBUSY while the last member is exiting; the next start sweeps it
                if error.errno != errno.EBUSY or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.01)


def own_cgroup(mounts: str, memberships: str, version: int) -> Path | None:
    """The directory of this process's cgroup on the v2 hierarchy, or on v1's memory hierarchy;
    None when that hierarchy is not mounted, has no memory controller, or our group is outside the mount."""
    path: str | None = None
    for line in memberships.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, member = rest.partition(":")
        if (version == 2 and hierarchy == "0" and controllers == "") or (
            version == 1 and "memory" in controllers.split(",")
        ):
            path = member
    if path is None:
        return None
    for line in mounts.splitlines():
        fields = line.split(" ")
        separator = fields.index("-")
        root, mount_point = fields[3], fields[4]
        filesystem, options = fields[separator + 1], fields[separator + 3].split(",")
        if version == 2 and filesystem != "cgroup2":
            continue
        if version == 1 and (filesystem != "cgroup" or "memory" not in options):
            continue
        relative = os.path.relpath(path, root)
        if relative == ".." or relative.startswith("../"):
            continue
        directory = Path(_unescape(mount_point)) / relative
        if version == 2 and "memory" not in _words(directory / "cgroup.controllers"):
            return None
        return directory.resolve()
    return None


def _prepare_v2(directory: Path) -> None:
    """Give memory (and pids) to our group's children, moving our group's processes into a leaf first
    when the no-internal-processes rule requires it; then prove a child group can be made."""
    wanted = [name for name in ("memory", "pids") if name in _words(directory / "cgroup.controllers")]
    if not set(wanted) <= _words(directory / "cgroup.subtree_control"):
        try:
            _enable(directory, wanted)
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise
            leaf = directory / SERVER_LEAF
            leaf.mkdir(exist_ok=True)
            for pid in _members(directory):
                with contextlib.suppress(ProcessLookupError):
                    _write(leaf / "cgroup.procs", pid)
            _enable(directory, wanted)
    _probe(directory, "memory.max")


def _prepare_v1(directory: Path) -> None:
    _probe(directory, "memory.limit_in_bytes")


def _probe(directory: Path, limit_file: str) -> None:
    probe = directory / f"{_PREFIX}{os.getpid()}-0"
    probe.mkdir(exist_ok=True)
    try:
        _write(probe / limit_file, 64 * 1024 * 1024)
    finally:
        probe.rmdir()


def _enable(directory: Path, controllers: list[str]) -> None:
    _write(directory / "cgroup.subtree_control", " ".join(f"+{name}" for name in controllers))


def _remove_stale(directory: Path) -> None:
    """Groups left by a Strata process that died mid-call (kill -9): empty, so removable."""
    for entry in directory.iterdir():
        match = _STALE.match(entry.name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                entry.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _members(group: Path) -> list[int]:
    try:
        return [int(line) for line in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _write(path: Path, value: int | str) -> None:
    with open(path, "w") as handle:
        handle.write(str(value))


def _write_if_present(path: Path, value: int) -> bool:
    try:
        _write(path, value)
    except FileNotFoundError:
        return False
    return True


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat(path: Path, key: str) -> int | None:
    """A value of a "key value" per line file (memory.events, memory.oom_control)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)
