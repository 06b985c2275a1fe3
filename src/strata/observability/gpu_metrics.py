"""Prometheus view of the GPUs, served from a cached inventory.

`/metrics` calls `collect()` on the event loop, and NVML blocks, so a scrape never touches NVML:
`GpuMonitor` refreshes `latest` in a worker thread on a timer and `GpuCollector` only reads it.
Wiring: `monitor = GpuMonitor(); await monitor.start(15); registry.register(GpuCollector(lambda: monitor.latest))`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from strata.compute.inventory import GpuInventory, read_inventory_async

log = structlog.get_logger("strata.gpu")

_LABELS = ["gpu", "name"]


class GpuCollector(Collector):
    """Gauges per GPU, labelled by index and model name; nothing at all on a machine without GPUs."""

    def __init__(self, read: Callable[[], GpuInventory]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        # Declared so registering neither calls `read` nor misses a clash with another collector's names.
        yield from _families()

    def collect(self) -> Iterator[Metric]:
        inventory = self._read()
        if not inventory.available:
            return
        used, total, utilization, temperature, power = families = _families()
        for gpu in inventory.gpus:
            labels = [str(gpu.index), gpu.name]
            used.add_metric(labels, gpu.memory_used_bytes)
            total.add_metric(labels, gpu.memory_total_bytes)
            if gpu.utilization_gpu_pct is not None:
                utilization.add_metric(labels, gpu.utilization_gpu_pct / 100)
            if gpu.temperature_c is not None:
                temperature.add_metric(labels, gpu.temperature_c)
            if gpu.power_w is not None:
                power.add_metric(labels, gpu.power_w)
        yield from families


def _families() -> tuple[GaugeMetricFamily, ...]:
    return (
        GaugeMetricFamily("strata_gpu_memory_used_bytes", "GPU memory in use.", labels=_LABELS),
        GaugeMetricFamily("strata_gpu_memory_total_bytes", "GPU memory installed.", labels=_LABELS),
        GaugeMetricFamily("strata_gpu_utilization_ratio", "Share of time a kernel ran (0..1).", labels=_LABELS),
        GaugeMetricFamily("strata_gpu_temperature_celsius", "GPU core temperature.", labels=_LABELS),
        GaugeMetricFamily("strata_gpu_power_watts", "GPU power draw.", labels=_LABELS),
    )


class GpuMonitor:
    """Keeps `latest` fresh from a background task so readers never wait on NVML.

    Refreshes skip the topology queries: links do not change while the machine runs.
    """

    def __init__(self, read: Callable[[], Awaitable[GpuInventory]] | None = None) -> None:
        self._read = read or (lambda: read_inventory_async(topology=False))
        self._task: asyncio.Task[None] | None = None
        self.latest = GpuInventory.unavailable("GPU inventory not read yet")

    async def refresh(self) -> GpuInventory:
        inventory = await self._read()
        if inventory.available != self.latest.available or inventory.reason != self.latest.reason:
            log.info("gpu.inventory", available=inventory.available, gpus=len(inventory.gpus), reason=inventory.reason)
        self.latest = inventory
        return inventory

    async def start(self, interval_s: float = 15.0) -> None:
        """Reads once before returning, so the first scrape already has data, then every `interval_s`."""
        if self._task is not None:
            return
        await self._refresh_logged()
        self._task = asyncio.create_task(self._loop(interval_s), name="gpu-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._refresh_logged()

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception:  # a bug in one refresh must neither stop startup nor silence GPU metrics for good
            log.exception("gpu.refresh_failed")
