"""Prometheus view of the serving layer, computed at scrape time from the router's live state,
so the request path pays nothing for it. Labels are bounded: model and deployment names only."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from strata.resilience.breaker import BreakerState
from strata.serving.router import Router


class ServingCollector(Collector):
    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "deployment"]
        up = GaugeMetricFamily("strata_deployment_up", "1 when the deployment's health check passes.", labels=labels)
        in_flight = GaugeMetricFamily(
            "strata_deployment_in_flight", "Requests running on the deployment.", labels=labels
        )
        queued = GaugeMetricFamily("strata_deployment_queued", "Requests waiting for admission.", labels=labels)
        breaker = GaugeMetricFamily(
            "strata_deployment_breaker_state",
            "Circuit breaker state, one series per state with value 1 for the current one.",
            labels=[*labels, "state"],
        )
        for deployment in self._router.deployments:
            key = [deployment.model, deployment.name]
            up.add_metric(key, 1.0 if deployment.healthy else 0.0)
            in_flight.add_metric(key, deployment.admission.in_flight)
            queued.add_metric(key, deployment.admission.queued)
            current = deployment.breaker.state
            for state in BreakerState:
                breaker.add_metric([*key, state.value], 1.0 if state is current else 0.0)
        yield from (up, in_flight, queued, breaker)

        retries = CounterMetricFamily("strata_retries", "Retries of failed upstream attempts.", labels=["model"])
        refused = CounterMetricFamily(
            "strata_retry_budget_exhausted", "Retries the retry budget refused.", labels=["model"]
        )
        fallbacks = CounterMetricFamily("strata_fallbacks", "Requests passed on to a fallback model.", labels=["model"])
        overloaded = CounterMetricFamily(
            "strata_overload_rejections", "Requests refused with 503: every deployment at capacity.", labels=["model"]
        )
        circuit_open = CounterMetricFamily(
            "strata_circuit_open_rejections", "Requests refused with 503: every breaker open.", labels=["model"]
        )
        panic = GaugeMetricFamily(
            "strata_model_panic",
            "1 while too few of the model's breakers are closed (breaker.panic_threshold): every deployment "
            "takes requests, open ones too.",
            labels=["model"],
        )
        panic_attempts = CounterMetricFamily(
            "strata_panic_attempts",
            "Attempts sent to a deployment whose breaker refused, because the model was in panic.",
            labels=["model"],
        )
        for name in self._router.models:
            if not self._router.is_model(name):
                continue
            pool = self._router.pool(name)
            retries.add_metric([name], pool.stats.retries)
            refused.add_metric([name], pool.budget.refused)
            fallbacks.add_metric([name], pool.stats.fallbacks)
            overloaded.add_metric([name], pool.stats.overloaded)
            circuit_open.add_metric([name], pool.stats.circuit_open)
            panic.add_metric([name], 1.0 if pool.panicking else 0.0)
            panic_attempts.add_metric([name], pool.stats.panic)
        yield from (retries, refused, fallbacks, overloaded, circuit_open, panic, panic_attempts)
