"""The benchmark scenarios. Each runs the load generator as a separate process against the mock upstream directly
(the floor) and through Strata, back to back in the same run, and returns a JSON-able dict."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.servers import REPO_ROOT, BenchServers, cpu_seconds, rss_mb

PCTS = ("p50", "p90", "p99")


@dataclass
class Settings:
    quick: bool = False
    overhead_rates: list[float] = field(default_factory=lambda: [50.0, 100.0, 200.0])
    overhead_duration_s: float = 20.0
    throughput_concurrency: list[int] = field(default_factory=lambda: [32, 64])
    throughput_duration_s: float = 15.0
    streams: int = 1000
    stream_chunks: int = 100
    stream_interval_ms: float = 20.0
    warmup_s: float = 2.0

    @classmethod
    def for_mode(cls, quick: bool, duration_s: float | None = None) -> Settings:
        if not quick:
            s = cls()
        else:
            s = cls(
                quick=True,
                overhead_rates=[100.0],
                overhead_duration_s=3.0,
                throughput_concurrency=[32],
                throughput_duration_s=3.0,
                streams=50,
                warmup_s=1.0,
            )
        if duration_s is not None:
            s.overhead_duration_s = s.throughput_duration_s = duration_s
        return s


def loadgen(url: str, api_key: str | None, mode: str, limit_s: float, **options: Any) -> dict[str, Any]:
    """Run `bench.loadgen` in its own process and return its JSON summary."""
    argv = [sys.executable, "-m", "bench.loadgen", "--url", url, "--mode", mode]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    if api_key:
        argv += ["--api-key", api_key]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=limit_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def closed_loop_cpu(
    url: str, api_key: str | None, concurrency: int, limit_s: float, common: dict[str, Any], cpu: Callable[[], float]
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """A closed-loop run, and the server's CPU over it (`cpu()`: its CPU seconds so far): `cpu_s`, `cpu_util`
    (cores) and `cpu_ms_per_request` (warm-up requests included, as the CPU of the warm-up is)."""
    cpu0, wall0 = cpu(), time.monotonic()
    result = loadgen(url, api_key, "closed", limit_s, concurrency=concurrency, **common)
    used, wall = cpu() - cpu0, time.monotonic() - wall0
    requests = result["ok"] + result["warmup_ok"]
    return result, {
        "cpu_s": used,
        "cpu_util": used / wall if wall else 0.0,
        "cpu_ms_per_request": used / requests * 1000.0 if requests else None,
    }


def _added(strata: dict[str, float], direct: dict[str, float]) -> dict[str, float]:
    return {p: strata[p] - direct[p] for p in PCTS if p in strata and p in direct}


def overhead(servers: BenchServers, s: Settings, log: Any = print) -> dict[str, Any]:
    """Non-streaming chat completions at fixed rates (open loop): latency direct vs through Strata."""
    rows = []
    for rate in s.overhead_rates:
        common = {"rate": rate, "duration": s.overhead_duration_s, "warmup": s.warmup_s}
        timeout = s.overhead_duration_s + s.warmup_s + 60
        direct = loadgen(servers.mock_url, None, "open", timeout, **common)
        strata = loadgen(servers.strata_url, servers.user_key, "open", timeout, **common)
        row = {
            "rate": rate,
            "direct": direct,
            "strata": strata,
            "added_ms": _added(strata["latency_ms"], direct["latency_ms"]),
        }
        rows.append(row)
        log(
            f"overhead @ {rate:g} rps: direct p50 {direct['latency_ms']['p50']:.2f} p99 "
            f"{direct['latency_ms']['p99']:.2f} ms | strata p50 {strata['latency_ms']['p50']:.2f} p99 "
            f"{strata['latency_ms']['p99']:.2f} ms | errors {direct['errors']}/{strata['errors']}"
        )
    return {"duration_s": s.overhead_duration_s, "rates": rows}


def throughput(servers: BenchServers, s: Settings, log: Any = print) -> dict[str, Any]:
    """Closed loop at fixed concurrency: requests per second at saturation, and Strata's CPU per request."""
    timeout = s.throughput_duration_s + s.warmup_s + 60
    top = max(s.throughput_concurrency)
    common = {"duration": s.throughput_duration_s, "warmup": s.warmup_s}
    ceiling = loadgen(servers.mock_url, None, "closed", timeout, concurrency=top, **common)
    log(
        f"throughput direct (loadgen ceiling) c={top}: {ceiling['achieved_rps']:.0f} req/s, "
        f"loadgen CPU {ceiling['loadgen_cpu_util']:.2f} cores"
    )
    rows = []
    assert servers.strata is not None
    pid = servers.strata.pid
    for concurrency in s.throughput_concurrency:
        result, cpu = closed_loop_cpu(servers.strata_url, servers.user_key, concurrency, timeout, common,
                                      lambda: cpu_seconds(pid))  # fmt: skip
        row = {"concurrency": concurrency, "strata": result, **{f"strata_{k}": v for k, v in cpu.items()}}
        rows.append(row)
        log(
            f"throughput strata c={concurrency}: {result['achieved_rps']:.0f} req/s, errors "
            f"{result['errors'] + result['warmup_errors']}, p50 {result['latency_ms'].get('p50', 0):.1f} ms, "
            f"Strata CPU {row['strata_cpu_util']:.2f} cores, {row['strata_cpu_ms_per_request'] or 0:.2f} ms/req, "
            f"loadgen CPU {result['loadgen_cpu_util']:.2f} cores"
        )
    return {"duration_s": s.throughput_duration_s, "ceiling": ceiling, "rows": rows}


class _RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_mb = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            except OSError:
                return
            self.stopping.wait(self.every_s)


def streaming(servers: BenchServers, s: Settings, log: Any = print) -> dict[str, Any]:
    """N concurrent SSE streams of fixed chunk count and interval: completion, inter-chunk gaps, Strata's RSS."""
    stream_s = s.stream_chunks * s.stream_interval_ms / 1000.0
    ramp = min(1.0, stream_s / 2)  # every stream starts before the first one ends: all N are open at once
    options = {"streams": s.streams, "expect_chunks": s.stream_chunks, "ramp_s": ramp, "timeout_s": stream_s + 60}
    timeout = stream_s + ramp + 120
    direct = loadgen(servers.mock_url, None, "stream", timeout, **options)
    assert servers.strata is not None
    pid = servers.strata.pid
    rss_before = rss_mb(pid)
    sampler = _RssSampler(pid)
    sampler.start()
    try:
        strata = loadgen(servers.strata_url, servers.user_key, "stream", timeout, **options)
    finally:
        sampler.stopping.set()
        sampler.join()
    result = {
        "streams": s.streams,
        "chunks": s.stream_chunks,
        "interval_ms": s.stream_interval_ms,
        "ramp_s": ramp,
        "direct": direct,
        "strata": strata,
        "added_gap_ms": _added(strata["gap_ms"], direct["gap_ms"]),
        "strata_rss_before_mb": rss_before,
        "strata_rss_peak_mb": max(sampler.peak_mb, rss_mb(pid)),
        "strata_rss_hwm_mb": rss_mb(pid, "VmHWM"),
    }
    log(
        f"streaming x{s.streams}: complete direct {direct['complete']} / strata {strata['complete']}; gap p99 "
        f"direct {direct['gap_ms'].get('p99', 0):.2f} strata {strata['gap_ms'].get('p99', 0):.2f} ms; "
        f"Strata RSS {rss_before:.0f} -> peak {result['strata_rss_peak_mb']:.0f} MiB"
    )
    return result


def collector_stats(servers: BenchServers) -> dict[str, Any]:
    """What the OTLP sink received: evidence that spans were exported during the run."""
    try:
        return httpx.get(f"http://127.0.0.1:{servers.collector_port}/_stats", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}


SCENARIOS = {"overhead": overhead, "throughput": throughput, "streaming": streaming}
