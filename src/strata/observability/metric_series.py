"""The last hour of this replica's request metrics as time series: what the console's overview charts draw.

Prometheus keeps the real history (with every replica's series); this is for a console that works with nothing
else installed. Every `interval_s` the totals of the app's own registry are read (request counts by status,
the latency and time-to-first-token histograms, output tokens) and kept for an hour; a point is the difference
between two readings: requests and tokens per second, the share of 5xx answers, and quantiles interpolated in
the histograms' buckets the way PromQL's `histogram_quantile` does. Only API traffic counts (routes under
`/v1/`): probes, scrapes and the console's own pages would drown it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

QUANTILES = (0.5, 0.95, 0.99)
_REQUESTS = "strata_requests"
_DURATION = "strata_request_duration_seconds"
_TTFT = "strata_time_to_first_token_seconds"
_TOKENS = "gen_ai_client_token_usage"


@dataclass
class Reading:
    """Cumulative totals at one moment."""

    at: float
    requests: float = 0.0
    errors: float = 0.0
    output_tokens: float = 0.0
    duration: dict[float, float] = field(default_factory=dict)  # bucket bound -> cumulative count
    ttft: dict[float, float] = field(default_factory=dict)


def read(registry: CollectorRegistry, at: float) -> Reading:
    reading = Reading(at)
    for metric in registry.collect():
        if metric.name == _REQUESTS:
            for sample in metric.samples:
                if sample.name.endswith("_total") and _is_api(sample.labels):
                    reading.requests += sample.value
                    if sample.labels.get("status", "").startswith("5"):
                        reading.errors += sample.value
        elif metric.name == _DURATION:
            _add_buckets(reading.duration, (s for s in metric.samples if _is_api(s.labels)))
        elif metric.name == _TTFT:
            _add_buckets(reading.ttft, metric.samples)
        elif metric.name == _TOKENS:
            for sample in metric.samples:
                if sample.name.endswith("_sum") and sample.labels.get("gen_ai_token_type") == "output":
                    reading.output_tokens += sample.value
    return reading


def _is_api(labels: dict[str, str]) -> bool:
    return labels.get("route", "").startswith("/v1/")


def _add_buckets(into: dict[float, float], samples: Iterable[Any]) -> None:
    for sample in samples:
        if sample.name.endswith("_bucket"):
            bound = float(sample.labels["le"])
            into[bound] = into.get(bound, 0.0) + sample.value


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """`histogram_quantile(q, ...)` over cumulative bucket counts; None with no observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its upper bound, as PromQL answers
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def point(before: Reading, after: Reading) -> dict[str, float | None]:
    """One chart point: what happened between two readings."""
    seconds = max(after.at - before.at, 1e-3)
    requests = after.requests - before.requests
    duration = {b: c - before.duration.get(b, 0.0) for b, c in after.duration.items()}
    ttft = {b: c - before.ttft.get(b, 0.0) for b, c in after.ttft.items()}
    values: dict[str, float | None] = {
        "time": round(after.at, 3),
        "requests_per_s": requests / seconds,
        "error_rate": (after.errors - before.errors) / requests if requests > 0 else None,
        "tokens_per_s": (after.output_tokens - before.output_tokens) / seconds,
    }
    for q in QUANTILES:
        values[f"latency_p{round(q * 100)}_s"] = quantile(q, duration)
    values["ttft_p50_s"] = quantile(0.5, ttft)
    values["ttft_p95_s"] = quantile(0.95, ttft)
    return values


class MetricSeries:
    """Readings of `registry` every `interval_s`, an hour of them; `points()` adds the interval in progress."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        interval_s: float = 10.0,
        keep_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.clock = clock
        self.readings: deque[Reading] = deque(maxlen=int(keep_s / interval_s) + 1)
        self._task: asyncio.Task[None] | None = None

    def take(self) -> None:
        self.readings.append(read(self.registry, self.clock()))

    def points(self) -> list[dict[str, float | None]]:
        readings = [*self.readings, read(self.registry, self.clock())]
        return [point(a, b) for a, b in itertools.pairwise(readings)]

    async def start(self) -> None:
        self.take()
        self._task = asyncio.create_task(self._loop(), name="metric-series")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.take()
