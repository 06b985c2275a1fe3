"""The console's overview series: points between readings of the app's own metrics registry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from strata.observability.metric_series import MetricSeries, quantile
from strata.observability.request_metrics import RequestMetrics


def test_quantiles_interpolate_in_buckets_as_promql_does() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.3)
    assert quantile(0.95, buckets) == pytest.approx(0.75)
    assert quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


def test_a_point_is_the_traffic_between_two_readings_of_api_routes_only() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    now = [1000.0]
    series = MetricSeries(registry, interval_s=10, clock=lambda: now[0])
    series.take()
    for status in (200, 200, 200, 500):
        metrics.observe_request("/v1/chat/completions", "POST", "m", status, 0.2)
    metrics.observe_request("/healthz", "GET", "", 200, 0.001)  # probes do not count
    now[0] += 2.0
    (point,) = series.points()
    assert point["time"] == 1002.0
    assert point["requests_per_s"] == pytest.approx(2.0)
    assert point["error_rate"] == pytest.approx(0.25)
    assert 0.1 < point["latency_p50_s"] <= 0.25
    assert point["ttft_p50_s"] is None
    series.take()
    now[0] += 10.0
    assert len(series.points()) == 2 and series.points()[-1]["requests_per_s"] == 0.0
