"""Scenario: `server.workers` N against 1, the throughput scenario's closed loop on a second Strata with N workers
(the same mock upstream shape, the same run), and Strata's CPU per request summed over all its processes."""

from __future__ import annotations

import os
from typing import Any

from bench.report import fmt, verdict
from bench.scenarios import Settings, closed_loop_cpu
from bench.servers import BenchServers, tree_cpu_seconds

NAME = "workers"
TARGET_SPEEDUP = 1.7  # on 2 cores: N=2 against 1


def worker_count() -> int:
    return max(2, min(4, len(os.sched_getaffinity(0))))


def _measure(servers: BenchServers, s: Settings, concurrency: int) -> dict[str, Any]:
    assert servers.strata is not None
    pid = servers.strata.pid
    timeout = s.throughput_duration_s + s.warmup_s + 60
    common = {"duration": s.throughput_duration_s, "warmup": s.warmup_s}
    result, cpu = closed_loop_cpu(servers.strata_url, servers.user_key, concurrency, timeout, common,
                                  lambda: tree_cpu_seconds(pid))  # fmt: skip
    return {"strata": result, **{f"strata_{k}": v for k, v in cpu.items()}}


def run(servers: BenchServers, s: Settings, log: Any = print) -> dict[str, Any]:
    concurrency = max(s.throughput_concurrency)
    n = worker_count()
    one = _measure(servers, s, concurrency)
    with BenchServers(s.stream_chunks, s.stream_interval_ms, workers=n) as many_servers:
        many = _measure(many_servers, s, concurrency)
    speedup = many["strata"]["achieved_rps"] / one["strata"]["achieved_rps"] if one["strata"]["achieved_rps"] else 0
    for label, row in (("1 worker", one), (f"{n} workers", many)):
        log(
            f"workers: {label} c={concurrency}: {row['strata']['achieved_rps']:.0f} req/s, p50 "
            f"{row['strata']['latency_ms'].get('p50', 0):.1f} ms, Strata CPU {row['strata_cpu_util']:.2f} cores, "
            f"{row['strata_cpu_ms_per_request'] or 0:.2f} ms/req, loadgen CPU {row['strata']['loadgen_cpu_util']:.2f}"
        )
    log(f"workers: {n} against 1: {speedup:.2f}x")
    return {"concurrency": concurrency, "workers": n, "cores": len(os.sched_getaffinity(0)), "one": one,
            "many": many, "speedup": speedup}  # fmt: skip


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    r = results.get("scenarios", {}).get(NAME)
    if not r:
        return []
    one, many = r["one"], r["many"]
    detail = (
        f"{many['strata']['achieved_rps']:.0f} against {one['strata']['achieved_rps']:.0f} req/s "
        f"(c={r['concurrency']}, {r['cores']} cores)"
    )
    where = f"Workers: {r['workers']} against 1"
    out = [(where, "throughput", f">= {TARGET_SPEEDUP:g}x", f"{r['speedup']:.2f}x: {detail}",
            verdict(r["speedup"] >= TARGET_SPEEDUP))]  # fmt: skip
    per_request = one["strata_cpu_ms_per_request"]
    out.append((where, "Strata CPU per request (1 worker)", "<= 0.5 ms", f"{fmt(per_request)} ms",
                verdict(per_request is not None and per_request <= 0.5)))  # fmt: skip
    return out


def section(results: dict[str, Any]) -> list[str]:
    r = results.get("scenarios", {}).get(NAME)
    if not r:
        return []
    lines = [
        "",
        f"### Workers ({r['workers']} against 1, closed loop c={r['concurrency']}, {r['cores']} cores)",
        "",
        "| Strata | req/s | p50 / p99 (ms) | Strata CPU (cores) | CPU per request (ms) | Loadgen CPU (cores) |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in (("1 worker", r["one"]), (f"{r['workers']} workers", r["many"])):
        x = row["strata"]
        lines.append(
            f"| {label} | {x['achieved_rps']:.0f} | {fmt(x['latency_ms'].get('p50'))} / "
            f"{fmt(x['latency_ms'].get('p99'))} | {row['strata_cpu_util']:.2f} | "
            f"{fmt(row['strata_cpu_ms_per_request'])} | {x['loadgen_cpu_util']:.2f} |"
        )
    return lines


METHOD = [
    "**Workers**: the throughput scenario's closed loop at its highest concurrency, first on the run's Strata (one"
    " worker), then on a second Strata started with `server.workers` N (min(cores, 4), at least 2) against its own"
    " mock upstream. CPU is the sum over Strata's processes (supervisor, workers and what they started). On a"
    " machine whose cores the load generator and mock also need, the speedup is bounded by what is left to Strata.",
]
