"""`kind: triton`: a model served by Triton Inference Server, reached through a launched adapter.

Strata launches `strata.serving.triton_adapter` on loopback (supervised, restarted, stopped like the embedded
server and vLLM) and talks OpenAI to it; the adapter talks KServe v2 gRPC to Triton. Keeping gRPC and the
tensor conventions in that one process leaves the dispatcher, breakers, retries, streaming relay and
accounting exactly as they are for every other backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from strata.config import TritonModelConfig
from strata.serving.deployment import Guards
from strata.serving.launched import LOOPBACK, Launch, LaunchedDeployment, base_child_env
from strata.serving.triton_adapter import SETTINGS_ENV, TOKEN_ENV
from strata.serving.usage import TokenCounter

ADAPTER_MODULE = "strata.serving.triton_adapter"


class TritonDeployment(LaunchedDeployment):
    kind = "triton"
    label = "Triton adapter"

    def __init__(self, config: TritonModelConfig, data_dir: Path, guards: Guards, counter: TokenCounter) -> None:
        self.config = config
        super().__init__(config, data_dir=data_dir, guards=guards, counter=lambda _client: counter)

    def launch(self, port: int, token: str) -> Launch:
        c = self.config
        settings = {
            "url": c.url,
            "triton_model": c.triton_model or c.name,
            "served_name": c.name,
            "chat_template": c.chat_template,
            "input_tensor": c.input_tensor,
            "output_tensor": c.output_tensor,
            "max_tokens_tensor": c.max_tokens_tensor,
            "stream_tensor": c.stream_tensor,
            "default_max_tokens": c.default_max_tokens,
        }
        env = {**base_child_env(), SETTINGS_ENV: orjson.dumps(settings).decode(), TOKEN_ENV: token}
        return Launch([sys.executable, "-m", ADAPTER_MODULE, "--host", LOOPBACK, "--port", str(port)], env)
