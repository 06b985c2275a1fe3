"""A smoke run of the benchmark harness (`python -m bench --quick`): every scenario, end to end, against a real
`strata serve`, the real LiteLLM proxy and LangGraph (installed into `.venv-peers` on first use), and the
embedded model; it writes its report. No timing is asserted here: numbers belong in BENCHMARKS.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bench.registry import SCENARIOS

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # minutes: every scenario against real servers, and the peers' install on a fresh clone
@pytest.mark.timeout(1500)
def test_quick_bench_run_measures_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    options = ["--duration", "2", "--out", str(out), "--results-dir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *options],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1450,  # the first run installs the peers (LiteLLM, LangGraph) from PyPI
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = out.read_text()
    assert "| Scenario | Metric | Target | Measured | Status |" in report

    rows = [line for line in report.splitlines() if re.match(r"\| \d\. ", line)]
    assert {row[2] for row in rows} == set("1234567"), "a scenario of issue 8 has no row in the results table"
    for row in rows:
        status = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert status in {"PASS", "**MISS**", "-"} or status.startswith("n/a"), row
        assert re.search(r"\d", row.split("|")[4]), f"no number measured in: {row}"

    results = json.loads((tmp_path / "results-quick.json").read_text())
    scenarios = results["scenarios"]
    assert set(scenarios) == set(SCENARIOS)
    assert not [name for name, result in scenarios.items() if "error" in result], "a scenario failed"
    overhead, throughput = scenarios["overhead"]["rates"], scenarios["throughput"]
    assert overhead and all(r["direct"]["errors"] == 0 and r["strata"]["errors"] == 0 for r in overhead)
    assert throughput["ceiling"]["errors"] == 0
    for row in throughput["rows"]:
        assert row["strata"]["ok"] > 0 and row["strata"]["errors"] == row["strata"]["warmup_errors"] == 0
    assert all(row["litellm"]["ok"] > 0 for row in scenarios["litellm"]["throughput"]["rows"])
    assert scenarios["streaming"]["strata"]["complete"] == scenarios["streaming"]["streams"]
    for row in scenarios["agent_steps"]["strata"]:  # every run completed with its five model steps
        assert row["completed"] == row["runs"] and row["errors"] == 0
    loaded = scenarios["overload"]["loaded"]
    assert loaded["ok"] > 0 and loaded["refused_without_retry_after"] == 0
