"""deploy/prometheus/alerts.yml under promtool, and the metric names it and the Grafana dashboard use.

promtool comes with Debian's `prometheus` package. Without it the promtool tests fail under CI
(CI=true) and are skipped elsewhere; the metric-name checks need nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from strata.compute.inventory import GpuInfo, GpuInventory
from strata.observability.gpu_metrics import GpuCollector
from strata.observability.request_metrics import TTFT_BUCKETS, RequestMetrics
from strata.observability.serving_metrics import ServingCollector
from strata.resilience.breaker import BreakerState
from strata.serving.pool import PoolStats

ROOT = Path(__file__).parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = [
    ROOT / "deploy" / "prometheus" / "alerts_test.yml",
    ROOT / "deploy" / "prometheus" / "alerts_test_long.yml",
]
DASHBOARD = ROOT / "deploy" / "grafana" / "strata-dashboard.json"
METRIC = re.compile(r"\b(?:strata|gen_ai)_[a-z0-9_]+\b")
RECORDED = re.compile(r"\bstrata:[a-z0-9_:]+\b")
LABEL_PARTS = re.compile(r"\{[^}]*\}|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names_in(expr: str) -> list[str]:
    """Metric names of a PromQL expression (label matchers and grouping labels left out)."""
    return METRIC.findall(LABEL_PARTS.sub(" ", expr))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is missing: apt-get install prometheus (Debian) puts it on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_the_rules_are_valid(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rule_unit_tests_pass(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout


def test_every_alert_has_a_test_that_fires_it() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule}  # fmt: skip
    fired = {
        case["alertname"]
        for path in RULE_TESTS
        for group in yaml.safe_load(path.read_text())["tests"]
        for case in group.get("alert_rule_test", ())
        if case.get("exp_alerts")
    }
    assert alerts - fired == set()


def exported_registry() -> CollectorRegistry:
    """Strata's /metrics registry as the app builds it, with every metric exercised once."""
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    metrics.observe_request("/v1/chat/completions", "POST", "m", 200, 0.1)
    metrics.observe_overhead("/v1/chat/completions", 0.0002)
    metrics.observe_ttft("m", 0.3)
    metrics.observe_tpot("m", 0.02)
    metrics.observe_tokens("m", 10, 5)
    metrics.observe_operation("m", 0.4)
    metrics.observe_cost("m", "key_1", 0.01)
    metrics.stream_failed("m", "upstream_unavailable")
    metrics.rate_limited("requests")
    metrics.budget_refused("key")
    metrics.run_finished("demo", "completed", 2.0)
    metrics.tool_called("calculator", "ok")
    deployment = SimpleNamespace(
        model="m",
        name="m/0",
        healthy=True,
        admission=SimpleNamespace(in_flight=1, queued=0),
        breaker=SimpleNamespace(state=BreakerState.CLOSED),
    )
    pool = SimpleNamespace(stats=PoolStats(), budget=SimpleNamespace(refused=0), panicking=False)
    router = SimpleNamespace(deployments=[deployment], models=["m"], is_model=lambda _: True, pool=lambda _: pool)
    registry.register(ServingCollector(router))  # type: ignore[arg-type]
    gpu = GpuInfo(0, "GPU-0", "NVIDIA H100", 80 << 30, 1 << 30, 50, 40, 300.0, 700.0)
    registry.register(GpuCollector(lambda: GpuInventory(available=True, gpus=[gpu])))
    return registry


def exported_names() -> set[str]:
    text = generate_latest(exported_registry()).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def rule_expressions() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["name"], variable["definition"]


@pytest.mark.parametrize("source", ["alerts.yml", "strata-dashboard.json"])
def test_every_metric_used_is_one_strata_exports(source: str) -> None:
    exported = exported_names()
    recorded = {name for name, _ in rule_expressions() if name.startswith("strata:")}
    expressions = list(rule_expressions() if source == "alerts.yml" else dashboard_expressions())
    assert expressions
    missing = {(where, name) for where, expr in expressions for name in metric_names_in(expr) if name not in exported}
    assert missing == set(), f"not in Strata's /metrics: {sorted(missing)}"
    unknown_records = {(where, name) for where, expr in expressions for name in RECORDED.findall(expr)} - {
        (where, name) for where, _ in expressions for name in recorded
    }
    assert unknown_records == set(), f"recording rules that alerts.yml does not define: {sorted(unknown_records)}"


def test_the_ttft_slo_bound_is_a_bucket() -> None:
    assert 2.0 in TTFT_BUCKETS  # alerts.yml counts first tokens under 2 s from the le="2.0" bucket
    assert 'le=~"2|2\\\\.0"' in RULES.read_text()


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("request rate", "errors", "latency", "first token", "tokens", "spend", "in flight", "queued",
                  "breaker", "gpu"):  # fmt: skip
        assert topic in titles, topic
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]
