"""A smoke run of the benchmark harness (`python -m bench --quick`): it runs end to end against a real
`strata serve` and writes its report. No timing is asserted here: numbers belong in BENCHMARKS.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_quick_bench_run_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    options = [
        "--scenarios",
        "overhead,throughput",
        "--duration",
        "2",
        "--out",
        str(out),
        "--results-dir",
        str(tmp_path),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *options],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = out.read_text()
    assert "| Scenario | Metric | Target | Measured | Status |" in report

    rows = [line for line in report.splitlines() if line.startswith("| 1. Overhead @") or line.startswith("| 2. Thr")]
    assert any("added latency p50" in row for row in rows)
    assert any("req/s at saturation" in row for row in rows)
    for row in rows:
        status = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert status in {"PASS", "**MISS**", "-"} or status.startswith("n/a"), row
        assert re.search(r"\d", row.split("|")[4]), f"no number measured in: {row}"
    assert "not yet measured" in report  # the phase-2 scenarios are listed, not hidden

    results = json.loads((tmp_path / "results-quick.json").read_text())
    overhead = results["scenarios"]["overhead"]["rates"]
    throughput = results["scenarios"]["throughput"]
    assert overhead and all(r["direct"]["errors"] == 0 and r["strata"]["errors"] == 0 for r in overhead)
    assert all(r["direct"]["ok"] > 0 and r["strata"]["ok"] > 0 for r in overhead)
    assert throughput["ceiling"]["errors"] == 0
    for row in throughput["rows"]:
        assert row["strata"]["ok"] > 0
        assert row["strata"]["errors"] == 0 and row["strata"]["warmup_errors"] == 0
