"""`python -m bench [--scenarios overhead,throughput,...] [--quick] [--out BENCHMARKS.md]`"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from bench import report
from bench.registry import SCENARIOS
from bench.scenarios import Settings, collector_stats
from bench.servers import REPO_ROOT, BenchServers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Strata benchmark harness")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, run in this order")
    parser.add_argument("--quick", action="store_true", help="short runs, 50 streams (a smoke run)")
    parser.add_argument("--list", action="store_true", help="print the scenarios and exit")
    parser.add_argument(
        "--render", type=Path, default=None, help="write the report from this results JSON (e.g. after adding notes)"
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per measured point (overrides)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    parser.add_argument("--results-dir", type=Path, default=None, help="chart and raw JSON (default: bench/results)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    if args.render is not None:
        results = json.loads(args.render.read_text())
        chart = report.chart(results, args.render.parent / "latency.png")
        report.write(results, args.out, chart, [SCENARIOS[name] for name in results["scenarios"] if name in SCENARIOS])
        return 0
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    settings = Settings.for_mode(args.quick, args.duration)
    results_dir = args.results_dir or REPO_ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    results: dict = {
        "started_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": settings.__dict__,
        "machine": report.machine(),
        "loadavg_before": report.loadavg(),
        "scenarios": {},
        "notes": [],
    }
    t0 = time.monotonic()
    with BenchServers(settings.stream_chunks, settings.stream_interval_ms) as servers:
        log(f"strata ready in {servers.ready_after_s:.1f} s (pid {servers.strata.pid if servers.strata else '?'})")
        for name in names:
            results["scenarios"][name] = SCENARIOS[name].run(servers, settings, log, results["scenarios"])
        time.sleep(1.5)  # let the batch span processor flush its last spans to the sink
        results["collector"] = collector_stats(servers)
    results["wall_s"] = time.monotonic() - t0
    results["loadavg_after"] = report.loadavg()
    raw = results_dir / ("results-quick.json" if settings.quick else "results.json")
    results["raw_path"] = str(raw.relative_to(REPO_ROOT)) if raw.is_relative_to(REPO_ROOT) else str(raw)
    raw.write_text(json.dumps(results, indent=2))
    chart = report.chart(results, results_dir / "latency.png")
    report.write(results, args.out, chart, [SCENARIOS[name] for name in names])
    log(f"wrote {args.out} and {raw}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
