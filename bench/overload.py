"""Scenario 7, overload: offer ten times the saturation rate, open loop, and look at both halves of the answer.

The admitted requests should keep their latency (p99 within 2x of the unloaded p99) and the rest should be
refused fast (429/503 with `Retry-After`, p99 under 5 ms), instead of every request queueing until it times out.
The saturation rate is the throughput scenario's best closed-loop rate when it ran in the same run, else it is
measured here; the unloaded p99 is measured here at a low rate, back to back with the overload.
"""

from __future__ import annotations

from typing import Any

from bench.report import fmt, verdict
from bench.scenarios import Settings, loadgen
from bench.servers import BenchServers, cpu_seconds

NAME = "overload"
UNLOADED_RPS = 100.0
MULTIPLIER = 10.0
# Clients keep pooled connections (the SDKs do): a crowd opening a new connection per request would measure
# TCP accept churn in one Python process (and the generator's own ceiling) rather than shedding.
CONNECTIONS = 512


def _saturation_rps(results_so_far: dict[str, Any] | None) -> float | None:
    thr = (results_so_far or {}).get("throughput")
    if not thr or not thr.get("rows"):
        return None
    return float(max(row["strata"]["achieved_rps"] for row in thr["rows"]))


def run(
    servers: BenchServers, s: Settings, log: Any = print, results_so_far: dict[str, Any] | None = None
) -> dict[str, Any]:
    duration = 2.0 if s.quick else 10.0
    warmup = 0.5 if s.quick else 1.0
    limit = duration + warmup + 120
    saturation = _saturation_rps(results_so_far)
    source = "throughput scenario"
    if saturation is None:
        probe = loadgen(servers.strata_url, servers.user_key, "closed", limit, concurrency=32, duration=duration,
                        warmup=warmup)  # fmt: skip
        saturation, source = probe["achieved_rps"], "measured here (closed loop, c=32)"
    unloaded = loadgen(servers.strata_url, servers.user_key, "open", limit, rate=UNLOADED_RPS, duration=duration,
                       warmup=warmup)  # fmt: skip
    offered = MULTIPLIER * saturation
    assert servers.strata is not None
    cpu0 = cpu_seconds(servers.strata.pid)
    loaded = loadgen(servers.strata_url, servers.user_key, "open", limit, rate=offered, duration=duration,
                     warmup=0, timeout_s=30, connections=CONNECTIONS)  # fmt: skip
    strata_cpu = cpu_seconds(servers.strata.pid) - cpu0
    result = {
        "duration_s": duration,
        "saturation_rps": saturation,
        "saturation_source": source,
        "offered_rps": offered,
        "unloaded": unloaded,
        "loaded": loaded,
        "strata_cpu_s": strata_cpu,
    }
    log(
        f"overload: saturation {saturation:.0f} req/s ({source}); unloaded p99 "
        f"{unloaded['latency_ms'].get('p99', 0):.1f} ms; at {offered:.0f} req/s offered: {loaded['ok']} ok "
        f"(p99 {loaded['latency_ms'].get('p99', 0):.1f} ms), {loaded['refused']} refused (p99 "
        f"{loaded['refused_ms'].get('p99', 0):.1f} ms, {loaded['refused_without_retry_after']} without Retry-After), "
        f"other errors {loaded['errors'] - loaded['refused']}; sent in {loaded['send_duration_s']:.1f} s"
    )
    return result


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    r = results.get("scenarios", {}).get(NAME)
    if not r:
        return []
    unloaded, loaded = r["unloaded"]["latency_ms"], r["loaded"]
    where = f"7. Overload @ {r['offered_rps']:.0f} req/s offered ({MULTIPLIER:g}x saturation)"
    admitted_p99, base_p99 = loaded["latency_ms"].get("p99"), unloaded.get("p99")
    ok = admitted_p99 is not None and base_p99 is not None and admitted_p99 <= 2 * base_p99
    detail = f"unloaded p99 {fmt(base_p99)} ms; admitted ({loaded['ok']}) p99 {fmt(admitted_p99)} ms"
    out = [(where, "admitted p99", "<= 2x unloaded p99", detail, verdict(ok))]
    refused_p99 = loaded["refused_ms"].get("p99")
    other = loaded["errors"] - loaded["refused"]
    detail = (
        f"{loaded['refused']} refused, p99 {fmt(refused_p99)} ms, {loaded['refused_without_retry_after']} without "
        f"Retry-After; other errors {other} ({', '.join(f'{k}: {v}' for k, v in loaded['error_kinds'].items())})"
    )
    fast = refused_p99 is not None and refused_p99 < 5.0 and loaded["refused_without_retry_after"] == 0
    out.append((where, "refusals: 429/503 + Retry-After", "< 5 ms", detail, verdict(fast and other == 0)))
    return out


def section(results: dict[str, Any]) -> list[str]:
    r = results.get("scenarios", {}).get(NAME)
    if not r:
        return []
    lines = [
        "",
        f"### Overload ({r['duration_s']:g} s open loop at {r['offered_rps']:.0f} req/s offered = {MULTIPLIER:g} x "
        f"{r['saturation_rps']:.0f} req/s saturation, {r['saturation_source']})",
        "",
        "| Load | Sent (achieved send rate) | OK | OK p50 / p99 (ms) | Refused | Refused p50 / p99 (ms) | "
        "Other errors | Loadgen CPU (cores) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, x in ((f"unloaded, {UNLOADED_RPS:g} req/s", r["unloaded"]), ("overload", r["loaded"])):
        send_rate = x["sent"] / x["send_duration_s"] if x["send_duration_s"] else 0.0
        lines.append(
            f"| {label} | {x['sent']} ({send_rate:.0f}/s) | {x['ok']} | {fmt(x['latency_ms'].get('p50'))} / "
            f"{fmt(x['latency_ms'].get('p99'))} | {x['refused']} | {fmt(x['refused_ms'].get('p50'))} / "
            f"{fmt(x['refused_ms'].get('p99'))} | {x['errors'] - x['refused']} | {x['loadgen_cpu_util']:.2f} |"
        )
    loaded = r["loaded"]
    lines.append(
        f"\nStrata's CPU from the first overload request until the last answer: {r['strata_cpu_s']:.1f} s for "
        f"{loaded['ok']} admitted and {loaded['refused']} refused requests."
    )
    thr = results.get("scenarios", {}).get("throughput")
    if thr and loaded["refused"]:
        per_admitted = min(row["strata_cpu_ms_per_request"] or 0.0 for row in thr["rows"]) / 1000.0
        per_refusal = max(0.0, r["strata_cpu_s"] - loaded["ok"] * per_admitted) / loaded["refused"]
        lines.append(
            f"With an admitted request at {per_admitted * 1000:.2f} ms of CPU (throughput scenario), a refusal cost "
            f"about {per_refusal * 1e6:.0f} µs of Strata's CPU (HTTP parsing in uvicorn included)."
        )
    return lines


METHOD = [
    "**Overload**: the saturation rate is the best closed-loop rate of the throughput scenario in the same run. The"
    " load generator first offers 100 req/s (the unloaded p99), then ten times the saturation rate, open loop, over"
    f" at most {CONNECTIONS} keep-alive connections (pooled clients, as the SDKs are) with a 30 s client timeout."
    " Latency is measured from the scheduled send (the table) and, in the raw results, from when the request's"
    " headers went out on a connection (`service_ms`, `refused_service_ms`). A refusal is a 429 or 503 and must"
    " carry `Retry-After`; anything else that is not a 200 is an error. Strata runs with `server.max_in_flight`"
    " 64.",
]
