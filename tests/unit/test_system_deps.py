"""scripts/ensure_system_deps.py, the first thing `make test` runs: it installs or starts what the suite needs
when it can (as root) and otherwise stops at once with one line naming what to install."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ensure_system_deps.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ensure_system_deps", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


deps = load()


class FakeMachine:
    """A machine with the given commands on PATH and services up; records what would be run."""

    def __init__(self, commands: set[str], services: set[str], *, root: bool = True, clusters: Sequence[str] = ("15",)):
        self.commands, self.services, self.ran = set(commands), set(services), []  # type: list[list[str]]
        self.machine = deps.Machine(
            which=lambda name: f"/usr/bin/{name}" if name in self.commands else None,
            is_root=root,
            answers=lambda kind, host, port: kind in self.services,
            run=self._run,
            postgres_clusters=lambda: list(clusters),
            sleep=lambda s: None,
        )

    def _run(self, command: Sequence[str]) -> int:
        self.ran.append(list(command))
        if command[:2] == ["apt-get", "install"]:
            self.commands |= {name for name, package, _ in (*deps.COMMANDS, *deps.OPTIONAL) if package in command}
        if command[0] == "pg_ctlcluster":
            self.services.add("postgresql")
        if command[0] == "redis-server":
            self.services.add("redis")
        return 0

    def ensure(self, dry_run: bool = False) -> list[str]:
        said: list[str] = []
        deps.ensure(self.machine, dry_run=dry_run, say=said.append)
        return said


EVERYTHING = {"bwrap", "promtool", "podman", "mmdebstrap", "haproxy", "chromium", "apt-get", "redis-server"}
SERVICES = {"postgresql", "redis"}


def test_a_complete_machine_needs_nothing() -> None:
    machine = FakeMachine(EVERYTHING, SERVICES)
    assert machine.ensure() == [] and machine.ran == []


def test_as_root_missing_packages_are_installed_with_apt() -> None:
    machine = FakeMachine({"apt-get", "redis-server"}, SERVICES)
    said = machine.ensure()
    assert machine.ran[0] == ["apt-get", "update", "-qq"]
    assert machine.ran[1][:2] == ["apt-get", "install"]
    assert machine.ran[1][-6:] == ["bubblewrap", "prometheus", "chromium", "podman", "mmdebstrap", "haproxy"]
    assert said == [
        "installing bubblewrap (bwrap), prometheus (promtool), chromium (chromium), podman (podman), "
        "mmdebstrap (mmdebstrap), haproxy (haproxy) with apt-get (the test suite needs it)..."
    ]


def test_optional_packages_are_installed_as_root_and_never_required_otherwise() -> None:
    required = {"bwrap", "promtool", "chromium", "apt-get", "redis-server"}
    root = FakeMachine(required, SERVICES)
    root.ensure()
    assert root.ran[1][-3:] == ["podman", "mmdebstrap", "haproxy"]
    user = FakeMachine(required, SERVICES, root=False)
    assert user.ensure() == [] and user.ran == []


def test_without_root_it_stops_with_one_line_naming_the_packages() -> None:
    machine = FakeMachine({"apt-get", "promtool", "chromium", "haproxy"}, SERVICES, root=False)
    with pytest.raises(deps.Missing) as missing:
        machine.ensure()
    assert (
        str(missing.value) == "the test suite needs bubblewrap (bwrap): install it (`sudo apt-get install bubblewrap`)"
    )
    assert machine.ran == []


def test_installed_services_that_are_down_are_started_and_waited_for() -> None:
    machine = FakeMachine(EVERYTHING, set())
    said = machine.ensure()
    assert machine.ran[0] == ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start"]
    assert machine.ran[1][:3] == ["redis-server", "--daemonize", "yes"]
    assert said == [
        "starting PostgreSQL at 127.0.0.1:5432 (the test suite needs it)...",
        "starting Redis at 127.0.0.1:6379 (the test suite needs it)...",
    ]


def test_a_service_that_is_not_installed_is_named() -> None:
    with pytest.raises(deps.Missing, match=r"needs PostgreSQL at 127.0.0.1:5432 .*`sudo apt-get install postgresql`"):
        FakeMachine(EVERYTHING, {"redis"}, clusters=()).ensure()
    with pytest.raises(
        deps.Missing, match=r"needs Redis at 127.0.0.1:6379: install it \(`sudo apt-get install redis-server`\)"
    ):
        FakeMachine(EVERYTHING - {"redis-server"}, {"postgresql"}).ensure()


def test_a_stopped_service_without_root_says_how_to_start_it() -> None:
    with pytest.raises(deps.Missing, match=r"installed but not running: start it \(`sudo pg_ctlcluster"):
        FakeMachine(EVERYTHING, {"redis"}, root=False).ensure()


def test_a_dry_run_changes_nothing_and_says_what_it_would_do() -> None:
    machine = FakeMachine(
        {"apt-get", "redis-server", "promtool", "podman", "mmdebstrap", "haproxy", "chromium"}, {"postgresql"}
    )
    said = machine.ensure(dry_run=True)
    assert machine.ran == []
    assert said[0].startswith(
        "would be installing bubblewrap (bwrap) with apt-get: apt-get update -qq; apt-get install"
    )
    assert said[1].startswith("would be starting Redis at 127.0.0.1:6379: redis-server --daemonize yes")


def test_the_script_runs_on_this_machine_in_dry_run() -> None:
    """This machine runs the suite, so it has what the suite needs: nothing to do, exit 0."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def make_dry_run(*args: str) -> list[str]:
    # Run under `make test` itself, a nested make would also print "Entering directory" and inherit its flags.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    command = ["make", "--no-print-directory", "-n", *args]
    result = subprocess.run(command, cwd=SCRIPT.parents[1], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_make_test_checks_the_machine_before_the_bootstrap_and_ci_only_calls_it() -> None:
    steps = make_dry_run("-B", "test")  # -B: the bootstrap's steps too, as on a fresh clone
    assert "scripts/ensure_system_deps.py" in steps[0]
    assert any("pytest -n" in step for step in steps)
    assert (SCRIPT.parents[1] / ".ci" / "run").read_text().rstrip().endswith("exec make test")


def test_the_bootstrap_shows_its_progress() -> None:
    steps = "\n".join(make_dry_run("-B", "bootstrap"))
    assert "--quiet" not in steps  # pip's own output shows, phase after phase
    assert "[1/3]" in steps and "[2/3]" in steps and "[3/3]" in steps
    assert "pip wheel -v" in steps  # the llama.cpp build shows its compile steps
