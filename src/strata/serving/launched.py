"""Deployments whose server Strata launches itself (the embedded llama.cpp server, vLLM).

Shared: one supervisor (launch, health wait, restart with backoff, graceful stop), a loopback
address on a free port, and a bearer token made anew for every launch and known only to Strata —
handed over through the environment or a 0600 file, never on the command line.
"""

from __future__ import annotations

import os
import secrets
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from strata.config import LaunchedModelBase
from strata.serving.client import OpenAIClient
from strata.serving.deployment import Deployment, Guards
from strata.serving.errors import BackendNotReadyError
from strata.serving.supervisor import ChildState, LaunchSpec, ProcessSupervisor, free_port
from strata.serving.usage import TokenCounter

LOOPBACK = "127.0.0.1"
# Passed through to a child; nothing else of Strata's environment (no secrets, no stray settings).
CHILD_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "LD_LIBRARY_PATH", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class Launch:
    """How to start the server for one launch on `port` with `token`."""

    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Endpoint:
    """Where a launched server listens on loopback, and the token it demands."""

    port: int
    token: str


def base_child_env() -> dict[str, str]:
    return {key: os.environ[key] for key in CHILD_ENV_KEYS if key in os.environ}


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (it may hold the launch token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class LaunchedDeployment(Deployment):
    label: str  # "llama.cpp", "vLLM": for logs and errors
    uuid_request_ids = False  # does the server accept only UUIDs as X-Request-ID?

    def __init__(
        self,
        config: LaunchedModelBase,
        *,
        data_dir: Path,
        guards: Guards,
        counter: Callable[[OpenAIClient], TokenCounter],
    ) -> None:
        model = config.name  # served under its Strata name
        self.run_dir = data_dir / "run"
        self.log_path = data_dir / "logs" / f"{model.replace('/', '_')}.log"
        self._port: int | None = None
        self._shared_token: str | None = None  # set by `share`
        self._attached: Endpoint | None = None  # set by `attach`
        self._answered_once = False  # attached: the server answered a probe at least once
        client = OpenAIClient(
            f"{model}/{self.kind}",
            f"http://{LOOPBACK}:0/v1",
            api_key=None,
            timeouts=config.timeouts,
            max_connections=config.max_connections,
            uuid_request_ids=self.uuid_request_ids,
        )
        super().__init__(model, model, client, counter(client), guards)
        self.supervisor = ProcessSupervisor(
            f"{self.label}:{model}",
            make_spec=self._launch_spec,
            is_healthy=self.client.probe,
            startup_timeout_s=config.startup_timeout_s,
            backoff_max_s=config.restart_backoff_max_s,
        )

    @abstractmethod
    def launch(self, port: int, token: str) -> Launch:
        """The command and environment of one launch."""

    def share(self) -> Endpoint:
        """Launch for several processes (the workers of one `strata serve`): one port and one token for the
        server's whole life, restarts included, so the workers that `attach` to it need telling only once. (A
        foreign process that takes the port while the server restarts makes the relaunch fail until it is free.)"""
        self._port = free_port(LOOPBACK)
        self._shared_token = secrets.token_urlsafe(32)
        return Endpoint(self._port, self._shared_token)

    def attach(self, endpoint: Endpoint) -> None:
        """Use the server another process launched (`share`) instead of launching one: health is then probed."""
        self._attached = endpoint

    def _launch_spec(self) -> LaunchSpec:
        if self._shared_token is None:  # shared: the port stays, even while TIME_WAIT would make free_port move it
            self._port = free_port(LOOPBACK, preferred=self._port)
        token = self._shared_token or secrets.token_urlsafe(32)
        self.client.set_endpoint(f"http://{LOOPBACK}:{self._port}/v1", token)
        launch = self.launch(self._port, token)
        return LaunchSpec(argv=launch.argv, env=launch.env, log_path=self.log_path)

    async def start(self) -> None:
        await self.client.start()
        if self._attached is not None:
            self.client.set_endpoint(f"http://{LOOPBACK}:{self._attached.port}/v1", self._attached.token)
            await self.probe()
            return
        self.supervisor.start()

    async def stop(self, grace_s: float) -> None:
        if self._attached is None:
            await self.supervisor.stop(grace_s)
        await self.client.close()

    def check_available(self) -> None:
        if self._attached is not None:
            # Until it first answers (it is loading): 503. After that a request goes through even when the last
            # probe failed: the supervisor restarts the server on the same port, and probes lag behind it.
            if not self._answered_once:
                raise BackendNotReadyError(
                    f"the {self.label} server of {self.model!r} is not answering yet; try again shortly",
                    deployment=self.name,
                    retry_after_s=1.0,
                )
            return
        if self.supervisor.state is not ChildState.READY:
            raise BackendNotReadyError(
                f"the {self.label} server of {self.model!r} is {self.supervisor.state.value}; try again shortly",
                deployment=self.name,
                retry_after_s=1.0,
            )

    async def probe(self) -> bool:
        if self._attached is not None:
            self._answered_once = await super().probe() or self._answered_once
            return self.healthy
        return self.healthy

    @property
    def healthy(self) -> bool:
        if self._attached is not None:
            return self._probe_ok
        # The supervisor health-checked the child before calling it ready and sees its exit at once.
        return self.supervisor.state is ChildState.READY

    @property
    def state(self) -> str:
        if self._attached is not None:
            return "ready" if self._probe_ok else "starting"
        return self.supervisor.state.value
