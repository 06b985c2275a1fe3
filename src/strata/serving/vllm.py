"""A vLLM server launched by Strata: `vllm serve` on the chosen GPUs, supervised like the embedded model.

The launch token reaches vLLM through `VLLM_API_KEY` (vLLM reads it from the environment), so it
never shows in `ps`.
"""

from __future__ import annotations

from pathlib import Path

from strata.config import VllmModelConfig
from strata.serving.deployment import Guards
from strata.serving.launched import LOOPBACK, Launch, LaunchedDeployment, base_child_env


class VllmDeployment(LaunchedDeployment):
    kind = "vllm"
    label = "vLLM"

    def __init__(self, config: VllmModelConfig, data_dir: Path, guards: Guards) -> None:
        self.config = config
        super().__init__(config, data_dir=data_dir, guards=guards)  # served as --served-model-name

    def launch(self, port: int, token: str) -> Launch:
        c = self.config
        argv = [c.executable, "serve", c.model, "--host", LOOPBACK, "--port", str(port), "--served-model-name", c.name]
        options = {
            "--tensor-parallel-size": c.tensor_parallel_size,
            "--gpu-memory-utilization": c.gpu_memory_utilization,
            "--max-model-len": c.max_model_len,
            "--dtype": c.dtype,
            "--quantization": c.quantization,
            "--kv-cache-dtype": c.kv_cache_dtype,
        }
        for flag, value in options.items():
            if value is not None:
                argv += [flag, str(value)]
        argv += c.extra_args
        env = {**base_child_env(), **c.env, "VLLM_API_KEY": token}
        if c.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in c.gpus)
        return Launch(argv, env)
