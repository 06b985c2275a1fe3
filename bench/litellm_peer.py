"""Scenario "litellm": the LiteLLM proxy measured like Strata in scenarios 1 and 2, against the same mock, in the
same run, with the same load generator and request body, so that the ratios in BENCHMARKS.md are side by side.

- overhead: open loop at the overhead scenario's rates, the mock directly (the floor) and then through LiteLLM,
  back to back; added latency is LiteLLM's percentile minus the direct one;
- throughput: closed loop at the throughput scenario's concurrencies, with LiteLLM's CPU time per request
  (its whole process tree, should it fork workers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.litellm_proxy import FEATURES, MASTER_KEY, LiteLLMProxy, tree_cpu_seconds, tree_pids
from bench.report import fmt, verdict
from bench.scenarios import PCTS, Settings, closed_loop_cpu, collector_stats, loadgen
from bench.servers import BenchServers, rss_mb

NAME = "litellm"


def _added(peer: dict[str, float], direct: dict[str, float]) -> dict[str, float]:
    return {p: peer[p] - direct[p] for p in PCTS if p in peer and p in direct}


def _overhead(proxy: LiteLLMProxy, servers: BenchServers, s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    skipped: list[float] = []
    for rate in sorted(s.overhead_rates):
        if rate > 100.0 and any(_saturated(r) for r in rows):
            skipped.append(rate)  # a higher rate would only measure a longer queue, for minutes
            continue
        common = {"rate": rate, "duration": s.overhead_duration_s, "warmup": s.warmup_s}
        # Past its saturation LiteLLM queues: the open loop then waits for the backlog to drain.
        timeout = s.overhead_duration_s + s.warmup_s + 120
        direct = loadgen(servers.mock_url, None, "open", timeout, **common)
        peer = loadgen(proxy.url, MASTER_KEY, "open", timeout, **common)
        rows.append(
            {
                "rate": rate,
                "direct": direct,
                "litellm": peer,
                "added_ms": _added(peer["latency_ms"], direct["latency_ms"]),
            }
        )
        log(
            f"litellm overhead @ {rate:g} rps: direct p50 {direct['latency_ms'].get('p50', 0):.2f} p99 "
            f"{direct['latency_ms'].get('p99', 0):.2f} ms | litellm p50 {peer['latency_ms'].get('p50', 0):.2f} p99 "
            f"{peer['latency_ms'].get('p99', 0):.2f} ms | errors {direct['errors']}/{peer['errors']}"
        )
    if skipped:
        log(f"litellm overhead: skipped {skipped} rps, LiteLLM was already saturated at a lower rate")
    return {"duration_s": s.overhead_duration_s, "rates": rows, "skipped_rates": skipped}


def _throughput(proxy: LiteLLMProxy, s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    timeout = s.throughput_duration_s + s.warmup_s + 90
    common = {"duration": s.throughput_duration_s, "warmup": s.warmup_s}
    rows = []
    for concurrency in s.throughput_concurrency:
        processes = len(tree_pids(proxy.pid))
        result, cpu = closed_loop_cpu(proxy.url, MASTER_KEY, concurrency, timeout, common,
                                      lambda: tree_cpu_seconds(proxy.pid))  # fmt: skip
        row = {
            "concurrency": concurrency,
            "litellm": result,
            "processes": processes,
            **{f"litellm_{k}": v for k, v in cpu.items()},
        }
        rows.append(row)
        log(
            f"litellm throughput c={concurrency}: {result['achieved_rps']:.0f} req/s, errors "
            f"{result['errors'] + result['warmup_errors']}, p50 {result['latency_ms'].get('p50', 0):.1f} ms, "
            f"LiteLLM CPU {row['litellm_cpu_util']:.2f} cores, {row['litellm_cpu_ms_per_request'] or 0:.2f} ms/req "
            f"({processes} process(es)), loadgen CPU {result['loadgen_cpu_util']:.2f} cores"
        )
    return {"duration_s": s.throughput_duration_s, "rows": rows}


def run(servers: BenchServers, s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Start the proxy, measure it, stop it. A failure is recorded, not raised: a peer must not sink Strata's run."""
    result: dict[str, Any] = {"features": FEATURES, "workers": 1}
    proxy = LiteLLMProxy(servers, log)
    sink0 = collector_stats(servers)
    try:
        with proxy:
            result.update(version=proxy.version, ready_after_s=proxy.ready_after_s)
            log(f"litellm {proxy.version} ready in {proxy.ready_after_s:.1f} s (pid {proxy.pid})")
            result["overhead"] = _overhead(proxy, servers, s, log)
            result["throughput"] = _throughput(proxy, s, log)
            result["rss_mb"] = sum(rss_mb(pid) for pid in tree_pids(proxy.pid))
            time.sleep(1.0)  # let its batch span processor send what it holds
            sink1 = collector_stats(servers)
            result["otlp"] = {k: sink1.get(k, 0) - sink0.get(k, 0) for k in ("trace_posts", "trace_bytes")}
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["log_tail"] = proxy.proc.logs(2000) if proxy.proc else ""
        log(f"litellm peer failed: {result['error'][:500]}")
    return result


def _best(rows: list[dict[str, Any]], who: str) -> dict[str, Any]:
    return max(rows, key=lambda r: r[who]["achieved_rps"])


def _at_100(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min(rows, key=lambda r: abs(r["rate"] - 100.0))


def _saturated(row: dict[str, Any]) -> bool:
    """LiteLLM served well under the offered rate: its latency there is queueing, not per-request overhead."""
    return bool(row["litellm"]["achieved_rps"] < 0.9 * row["rate"])


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    sc = results.get("scenarios", {})
    peer = sc.get(NAME)
    if not peer:
        return []
    if "error" in peer or not peer.get("throughput"):
        what = f"not measured: {peer.get('error', 'no result')}"[:300]
        return [("2. Throughput (peer)", "LiteLLM proxy req/s, same run", "Strata >= 10x", what, "-")]
    out: list[tuple[str, str, str, str, str]] = []
    best = _best(peer["throughput"]["rows"], "litellm")
    rps = best["litellm"]["achieved_rps"]
    errors = sum(r["litellm"]["errors"] + r["litellm"]["warmup_errors"] for r in peer["throughput"]["rows"])
    detail = (
        f"{rps:.0f} req/s at c={best['concurrency']}, {fmt(best['litellm_cpu_ms_per_request'])} ms CPU/req, "
        f"{errors} errors (LiteLLM {peer['version']}, 1 worker)"
    )
    out.append(("2. Throughput (peer)", "LiteLLM proxy req/s, same run", "(reported)", detail, "-"))
    if thr := sc.get("throughput"):
        mine = max(thr["rows"], key=lambda r: r["strata"]["achieved_rps"])
        ratio = mine["strata"]["achieved_rps"] / rps if rps else float("inf")
        detail = f"{ratio:.1f}x ({mine['strata']['achieved_rps']:.0f} / {rps:.0f} req/s, best concurrency of each)"
        cpu_mine, cpu_peer = mine.get("strata_cpu_ms_per_request"), best["litellm_cpu_ms_per_request"]
        if cpu_mine and cpu_peer:
            detail += f"; CPU/req Strata {cpu_mine:.2f} vs LiteLLM {cpu_peer:.2f} ms ({cpu_peer / cpu_mine:.1f}x)"
        out.append(("2. Throughput (peer)", "Strata / LiteLLM req/s", ">= 10x", detail, verdict(ratio >= 10.0)))
    else:
        out.append(("2. Throughput (peer)", "Strata / LiteLLM req/s", ">= 10x", "throughput scenario not run", "-"))
    if peer.get("overhead"):
        r = _at_100(peer["overhead"]["rates"])
        over = sc.get("overhead")
        theirs = _at_100(over["rates"])["added_ms"] if over else {}
        for pct in ("p50", "p99"):
            detail = f"LiteLLM +{fmt(r['added_ms'].get(pct))} ms"
            detail += f" vs Strata +{fmt(theirs.get(pct))} ms" if over else " (overhead scenario not run)"
            if _saturated(r):
                detail += f"; LiteLLM saturated (served {r['litellm']['achieved_rps']:.0f} req/s): queueing"
            metric = f"added latency {pct} @ {r['rate']:g} RPS"
            out.append(("1. Overhead (peer)", metric, "(reported)", detail, "-"))
    return out


def _trio(x: dict[str, float]) -> str:
    return " / ".join(fmt(x.get(p)) for p in PCTS)


def section(results: dict[str, Any]) -> list[str]:
    peer = results.get("scenarios", {}).get(NAME)
    if not peer:
        return []
    lines = ["", f"### LiteLLM proxy peer ({peer.get('version', '?')}, one worker, same mock, same run)", ""]
    if "error" in peer:
        tail = peer.get("log_tail", "").strip().splitlines()[-10:]
        return [*lines, f"Not measured: {peer['error']}", "", "```", *tail, "```"]
    lines += [f"- {f}" for f in peer["features"]]
    otlp = peer.get("otlp", {})
    lines += [
        f"- ready {peer['ready_after_s']:.1f} s after start; RSS {peer.get('rss_mb', 0):.0f} MiB after the run; "
        f"{otlp.get('trace_posts', '?')} OTLP export requests ({otlp.get('trace_bytes', 0) / 1e6:.1f} MB) reached "
        "the sink while it ran",
        "",
        f"Overhead ({peer['overhead']['duration_s']:g} s per point, open loop, ms):",
        "",
        "| Offered RPS | Direct p50 / p90 / p99 | LiteLLM p50 / p90 / p99 | Added p50 / p90 / p99 | "
        "Errors (direct / LiteLLM) | LiteLLM served req/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in peer["overhead"]["rates"]:
        d, p = r["direct"], r["litellm"]
        lines.append(
            f"| {r['rate']:g} | {_trio(d['latency_ms'])} | {_trio(p['latency_ms'])} | {_trio(r['added_ms'])} | "
            f"{d['errors']} / {p['errors']} | {p['achieved_rps']:.0f}{' (saturated)' if _saturated(r) else ''} |"
        )
    if skipped := peer["overhead"].get("skipped_rates"):
        rates = ", ".join(f"{x:g}" for x in skipped)
        lines += [
            "",
            f"Not run at {rates} RPS: LiteLLM was already saturated at a lower rate (only its queue would grow).",
        ]
    lines += [
        "",
        f"Throughput ({peer['throughput']['duration_s']:g} s per point, closed loop):",
        "",
        "| Concurrency | req/s | p50 / p99 (ms) | Errors | LiteLLM CPU (cores) | LiteLLM CPU ms/req | Processes | "
        "Loadgen CPU (cores) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in peer["throughput"]["rows"]:
        t = r["litellm"]
        lines.append(
            f"| {r['concurrency']} | {t['achieved_rps']:.0f} | {fmt(t['latency_ms'].get('p50'))} / "
            f"{fmt(t['latency_ms'].get('p99'))} | {t['errors'] + t['warmup_errors']} | {r['litellm_cpu_util']:.2f} | "
            f"{fmt(r['litellm_cpu_ms_per_request'])} | {r['processes']} | {t['loadgen_cpu_util']:.2f} |"
        )
    return lines


METHOD = [
    "**LiteLLM proxy peer**: `litellm --config ... --num_workers 1` (LiteLLM from `.venv-peers`, version in the"
    " LiteLLM section) routing `bench-model` to the same mock as Strata (`openai/bench-model`, `api_base` the mock)."
    " Features on, as far as LiteLLM allows without a database: master-key auth; per-deployment rpm/tpm limits"
    " (2^31-1) enforced in memory by the `usage-based-routing-v2` router strategy; per-response cost computed in"
    " memory; the open-source `prometheus` callback; the `otel` callback exporting every request over OTLP/HTTP to"
    " the same sink as Strata; JSON logs with uvicorn's access log; telemetry and remote fetches off. Not on:"
    " virtual keys, per-key limits and persisted spend, which need PostgreSQL through Prisma, and Prisma's CLI"
    " downloads its engine binaries from binaries.prisma.sh at first use (checked: unreachable from this machine).",
    "**LiteLLM measurements**: in the same run as Strata, with the same load generator and request body: open loop"
    " at each overhead rate (mock direct, then through LiteLLM, back to back; added latency = LiteLLM percentile"
    " minus direct percentile) and closed loop at each throughput concurrency. LiteLLM's CPU per request is utime +"
    " stime of its whole process tree (one process with one worker) over the closed-loop run, warm-up included,"
    " divided by the requests it served. The Strata / LiteLLM ratio compares each one's best closed-loop req/s."
    " An open-loop point where LiteLLM served under 90% of the offered rate is marked saturated (its added latency"
    " there is queueing); once a point up to 100 RPS is saturated, higher rates are not run for LiteLLM.",
]
