"""Start `strata serve` as a real process for integration tests, and stop it the way operators do."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from strata.serving.supervisor import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
# The admin key every test server starts with (STRATA_ADMIN_KEY); tests make narrower keys from it.
ADMIN_KEY = "test-admin-key-not-for-production"
# What `strata serve` says when its port is taken (strata.startup), or when another process took it between that
# check and uvicorn's bind (uvicorn's message); the test server then moves.
PORT_IN_USE = ("is already in use", "address already in use")
PORT_ATTEMPTS = 5


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: its children, theirs, and so on."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


class PortTaken(Exception):
    """The port picked for a test server was bound by someone else before the server got it."""


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds the listening socket of TCP `port` (any address): who really answers there."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    try:
        return any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def start_listening(
    command: Callable[[int], list[str]], timeout_s: float = 20.0, **popen: Any
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server process on a free port (`command(port)`), and return once that process itself listens.
    A port another test worker took first makes the server exit: then it starts again on another port."""
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        process = subprocess.Popen(command(port), **popen)
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and not listens_on(process.pid, port):
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise TimeoutError(f"{command(port)} did not listen on {port} within {timeout_s}s")
            time.sleep(0.05)
        if process.returncode is None:
            return process, port
    raise RuntimeError(f"{command(0)[:3]}... exited on start-up {PORT_ATTEMPTS} times")


class StrataProcess:
    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        *,
        args: Sequence[str] = (),
        ca_file: Path | None = None,
        open_files: tuple[int, int] | None = None,
        split_stderr: bool = False,
    ) -> None:
        """`args`: extra `strata serve` options (e.g. --tls-cert/--tls-key). `ca_file`: the server speaks HTTPS
        with a certificate this PEM file vouches for; `url` becomes https:// and the helpers here trust it.
        `open_files`: the server's descriptor limits (soft, hard), as a small machine would have.
        `split_stderr`: standard error goes to `stderr_path` rather than into the log with standard output."""
        self.workdir = workdir
        self.open_files = open_files
        self.args = list(args)
        self.ca_file = ca_file
        self.port = free_port()
        # One process unless a test asks for workers: the default would follow the machine's cores.
        self.config = {**config, "server": {"workers": 1, **config.get("server", {}), "port": self.port}}
        self.config.setdefault("logging", {"format": "json", "level": "info"})
        self.config_path = workdir / "strata.yaml"
        self.log_path = workdir / "strata.log"
        self.stderr_path = workdir / "strata.stderr" if split_stderr else None
        self.env = {"STRATA_ADMIN_KEY": ADMIN_KEY, **(env or {})}
        self.api_key = self.env["STRATA_ADMIN_KEY"]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Admin credentials for the test's requests."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, api_key: str | None = None, **kwargs: Any) -> httpx.Client:
        """An HTTP client for this server, authenticated with `api_key` (default: the admin key)."""
        key = api_key or self.api_key
        kwargs.setdefault("verify", self.verify)
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, **kwargs)

    def create_key(self, role: str = "user", **fields: Any) -> str:
        """A new API key made through the admin API; returns its secret."""
        body = {"name": fields.pop("name", f"test-{role}"), "role": role, **fields}
        response = httpx.post(self.url + "/admin/keys", json=body, headers=self.headers, timeout=10, verify=self.verify)
        response.raise_for_status()
        return str(response.json()["key"])

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What httpx's `verify` needs to trust this server: its CA with HTTPS, the default otherwise."""
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file is not None else True

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, wait_ready: bool = True, timeout_s: float = 60.0) -> StrataProcess:
        """Start and wait until this process answers. Tests run in parallel processes, so the free port picked
        may be taken by another test's server before this one binds it: then it starts again on a new port."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._launch()
                if wait_ready:
                    self.wait_for("/readyz", timeout_s)
                    if "models" not in self.config:
                        self.wait_for_models(timeout_s)
                else:  # started: /readyz may still wait for a backend, but no longer for Strata's own start-up
                    self.wait_for("/readyz", timeout_s, lambda r: r.json().get("status") != "starting")
                return self
            except PortTaken:
                if attempt == PORT_ATTEMPTS - 1:
                    raise
                self.port = free_port()
                self.config = {**self.config, "server": {**self.config["server"], "port": self.port}}
            except BaseException:
                self._abandon()  # a server that never got ready (and its workers) must not outlive the test
                raise
        raise AssertionError("unreachable")

    def _abandon(self) -> None:
        if self.process is None:
            return
        below = descendants(self.process.pid)
        for pid in [self.process.pid, *below]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)

    def launch(self) -> StrataProcess:
        """Start without waiting for anything (nor moving to another port if this one is taken)."""
        self._launch()
        return self

    def _launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        env["PYTHONPATH"] = str(REPO_ROOT)  # test tools are referenced as tests.support....
        env.update(self.env)
        with self.log_path.open("ab") as log, contextlib.ExitStack() as stack:
            stderr: Any = subprocess.STDOUT
            if self.stderr_path is not None:
                stderr = stack.enter_context(self.stderr_path.open("ab"))
            self.process = subprocess.Popen(
                [sys.executable, "-m", "strata", "serve", "--config", str(self.config_path), *self.args],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=stderr,
                preexec_fn=self._limit_open_files if self.open_files is not None else None,
            )

    def _limit_open_files(self) -> None:
        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self.open_files)

    def wait_for(self, path: str, timeout_s: float, accept: Callable[[httpx.Response], bool] | None = None) -> None:
        """Until `path` answers 200 (or what `accept` takes) from this process: another test's server may hold the
        port meanwhile."""
        deadline = time.monotonic() + timeout_s
        verify = self.verify
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                if self.process.returncode != 0 and any(words in self.logs() for words in PORT_IN_USE):
                    raise PortTaken(self.port)
                raise RuntimeError(f"strata exited with {self.process.returncode}:\n{self.logs()}")
            try:
                response = httpx.get(self.url + path, timeout=1.0, verify=verify)
                answered = accept(response) if accept is not None else response.status_code == 200
            except httpx.HTTPError:
                answered = False
            if answered and self.listens():
                return
            time.sleep(0.05)
        raise TimeoutError(f"strata did not answer 200 on {path} within {timeout_s}s:\n{self.logs()}")

    def listens(self) -> bool:
        """This process, or one of its workers (`server.workers`), listens on the port."""
        assert self.process is not None
        pid = self.process.pid
        return listens_on(pid, self.port) or any(listens_on(child, self.port) for child in descendants(pid))

    def wait_for_models(self, timeout_s: float) -> None:
        """Until every model is healthy: /readyz is 200 once one is, and the default config has two (the embedded
        chat and embedding models), so a test's first chat could otherwise meet a model still loading."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            models = httpx.get(self.url + "/readyz", timeout=1.0, verify=self.verify).json().get("models") or {}
            if models and all(state in ("healthy", "ready") for state in models.values()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"not every model was healthy within {timeout_s}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        """kill -9, then what it started (its CPU pool's processes), as a container runtime kills a whole
        container: left alone, those would outlive the test under init."""
        assert self.process is not None
        below = descendants(self.process.pid)
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(10) == -signal.SIGKILL
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def children(self, command_contains: str) -> list[int]:
        """Pids of Strata's child processes whose command line contains `command_contains`
        (Strata also runs helpers, such as its CPU pool's fork server)."""
        assert self.process is not None
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid and command_contains in cmdline:
                    out.append(int(entry.name))
        return out
