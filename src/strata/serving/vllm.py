"""A vLLM server launched by Strata: `vllm serve` on the chosen GPUs, supervised like the embedded model.

The launch token reaches vLLM through `VLLM_API_KEY` (vLLM reads it from the environment), so it
never shows in `ps`.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import structlog

from strata.config import VllmModelConfig
from strata.serving.deployment import Guards
from strata.serving.launched import LOOPBACK, Launch, LaunchedDeployment, base_child_env
from strata.serving.usage import TokenCounter

log = structlog.get_logger("strata.vllm")
METRICS_INTERVAL_S = 5.0


class VllmDeployment(LaunchedDeployment):
    kind = "vllm"
    label = "vLLM"

    def __init__(self, config: VllmModelConfig, data_dir: Path, guards: Guards, counter: TokenCounter) -> None:
        self.config = config
        # Served as --served-model-name; vLLM reports usage in streams, so `counter` is rarely needed.
        super().__init__(config, data_dir=data_dir, guards=guards, counter=lambda _client: counter)
        #: vLLM's own Prometheus text, scraped in the background and re-exported under Strata's /metrics.
        self.upstream_metrics: str | None = None
        self._scraper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._scraper = asyncio.create_task(self._scrape_metrics(), name=f"vllm-metrics:{self.model}")

    async def stop(self, grace_s: float) -> None:
        if self._scraper is not None:
            self._scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scraper
        await super().stop(grace_s)

    async def _scrape_metrics(self) -> None:
        """Read vLLM's /metrics (at the server's root, next to /v1) while it is up."""
        timeout = aiohttp.ClientTimeout(total=2)
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S if self.upstream_metrics is not None else 0.5)
            if not self.healthy:
                continue
            url = self.client.base_url.removesuffix("/v1") + "/metrics"
            try:
                async with self.client.session.get(url, timeout=timeout) as response:
                    if response.status == 200:
                        self.upstream_metrics = await response.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("vLLM metrics unavailable", model=self.model, error=str(exc))

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
            # NVML (Strata's inventory and plans) numbers GPUs by PCI bus; CUDA's default order differs.
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in c.gpus)
        return Launch(argv, env)
