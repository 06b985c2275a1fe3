#!/usr/bin/env python3
"""What the test suite needs from the machine: present it, or say in one line what to install.

`make test` runs this first, before the virtual environment exists, so it uses the standard library only.
As root, missing Debian packages are installed with apt-get and installed-but-stopped PostgreSQL and Redis
are started; otherwise it exits 1 with one line naming what to install or start. `--dry-run` says what it
would do and changes nothing.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# (command, Debian package, why the suite needs it)
COMMANDS = (
    ("bwrap", "bubblewrap", "the python tool's sandbox"),
    ("promtool", "prometheus", "the alert rules' unit tests"),
    ("chromium", "chromium", "the console's browser tests (tests/browser, Playwright)"),
)
# Installed as well when this runs as root; without them, only the tests that need them are skipped.
OPTIONAL = (
    ("podman", "podman", "the image test"),
    ("mmdebstrap", "mmdebstrap", "the image test's Debian base"),
    ("haproxy", "haproxy", "the cluster tests' load balancer"),
)
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = ("127.0.0.1", 6379)
START_WAIT_S = 30.0
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Machine:
    """What the checks look at and act on; the tests hand in their own."""

    which: Callable[[str], str | None] = shutil.which
    is_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    answers: Callable[[str, str, int], bool] = field(default_factory=lambda: _answers)
    run: Callable[[Sequence[str]], int] = field(default_factory=lambda: _run)
    postgres_clusters: Callable[[], list[str]] = field(default_factory=lambda: _postgres_clusters)
    sleep: Callable[[float], None] = time.sleep


class Missing(Exception):
    """Something the suite needs that this script cannot provide; the message says what to do."""


def ensure(machine: Machine, *, dry_run: bool, say: Callable[[str], None]) -> None:
    """Raise Missing with one line for the first thing that cannot be made present."""
    _packages(machine, dry_run, say)
    host, port = _postgres_address()
    if not machine.answers("postgresql", host, port):
        _start_postgres(machine, host, port, dry_run, say)
    if not machine.answers("redis", *REDIS):
        _start_redis(machine, dry_run, say)


def _packages(machine: Machine, dry_run: bool, say: Callable[[str], None]) -> None:
    missing = [(command, package) for command, package, _ in COMMANDS if not machine.which(command)]
    can_install = machine.is_root and machine.which("apt-get")
    if not missing and not can_install:
        return
    packages = [package for _, package in missing]
    named = " and ".join(f"{package} ({command})" for command, package in missing)
    if missing and not can_install:
        them = "them" if len(packages) > 1 else "it"
        raise Missing(f"the test suite needs {named}: install {them} (`sudo apt-get install {' '.join(packages)}`)")
    optional = [(command, package) for command, package, _ in OPTIONAL if not machine.which(command)]
    if not missing and not optional:
        return
    wanted = [*missing, *optional]
    named = ", ".join(f"{package} ({command})" for command, package in wanted)
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *(package for _, package in wanted)]
    _act(machine, dry_run, say, f"installing {named} with apt-get", [["apt-get", "update", "-qq"], install])
    if not dry_run and (still := [command for command, _ in missing if not machine.which(command)]):
        raise Missing(f"apt-get installed {' '.join(packages)} but {', '.join(still)} is still not on PATH")


def _start_postgres(machine: Machine, host: str, port: int, dry_run: bool, say: Callable[[str], None]) -> None:
    where = f"PostgreSQL at {host}:{port}"
    clusters = machine.postgres_clusters()
    if host not in LOCAL_HOSTS:
        raise Missing(f"the test suite needs {where} (TEST_POSTGRES_URL), which does not answer")
    if not clusters:
        raise Missing(
            f"the test suite needs {where} (trust auth, database `test`; TEST_POSTGRES_URL overrides): "
            "install it (`sudo apt-get install postgresql`) or point TEST_POSTGRES_URL at one"
        )
    start = ["pg_ctlcluster", "--skip-systemctl-redirect", clusters[0], "main", "start"]
    if not machine.is_root:
        raise Missing(f"{where} is installed but not running: start it (`sudo {' '.join(start)}`)")
    _act(machine, dry_run, say, f"starting {where}", [start])
    _wait(machine, dry_run, "postgresql", host, port)


def _start_redis(machine: Machine, dry_run: bool, say: Callable[[str], None]) -> None:
    host, port = REDIS
    where = f"Redis at {host}:{port}"
    if not machine.which("redis-server"):
        raise Missing(f"the test suite needs {where}: install it (`sudo apt-get install redis-server`)")
    # Nothing to keep: the suite's data is throwaway.
    start = ["redis-server", "--daemonize", "yes", "--bind", host, "--port", str(port), "--save", "", "--appendonly"]
    start += [
        "no",
        "--dir",
        tempfile.gettempdir(),
        "--logfile",
        os.path.join(tempfile.gettempdir(), "strata-redis.log"),
    ]
    _act(machine, dry_run, say, f"starting {where}", [start])
    _wait(machine, dry_run, "redis", host, port)


def _act(machine: Machine, dry_run: bool, say: Callable[[str], None], what: str, commands: list[list[str]]) -> None:
    if dry_run:
        say(f"would be {what}: " + "; ".join(" ".join(c or "''" for c in command) for command in commands))
        return
    say(f"{what} (the test suite needs it)...")
    for command in commands:
        if machine.run(command) != 0:
            raise Missing(f"{what} failed: `{' '.join(command)}` exited non-zero")


def _wait(machine: Machine, dry_run: bool, kind: str, host: str, port: int) -> None:
    if dry_run:
        return
    deadline = time.monotonic() + START_WAIT_S
    while not machine.answers(kind, host, port):
        if time.monotonic() > deadline:
            raise Missing(f"{kind} was started but does not answer at {host}:{port} after {START_WAIT_S:.0f} s")
        machine.sleep(0.5)


def _postgres_address() -> tuple[str, int]:
    parts = urlsplit(POSTGRES_URL)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def _answers(kind: str, host: str, port: int) -> bool:
    """A TCP answer; Redis must also reply to PING (a port taken by something else does not count)."""
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            if kind != "redis":
                return True
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _run(command: Sequence[str]) -> int:
    return subprocess.run(list(command), env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode


def _postgres_clusters() -> list[str]:
    """Installed Debian PostgreSQL versions with a `main` cluster (what pg_ctlcluster can start)."""
    if not shutil.which("pg_ctlcluster"):
        return []
    found = sorted(glob.glob("/etc/postgresql/*/main"), reverse=True)
    return [os.path.basename(os.path.dirname(path)) for path in found]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="say what would be installed or started; change nothing")
    args = parser.parse_args(argv)
    try:
        ensure(Machine(), dry_run=args.dry_run, say=lambda line: print(line, flush=True))
    except Missing as exc:
        print(f"make test: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
