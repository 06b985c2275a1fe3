"""Re-export the Prometheus metrics of servers Strata launched (vLLM), labelled with the deployment,
so one scrape of Strata shows the inference engines too."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from strata.serving.router import Router
from strata.serving.vllm import VllmDeployment


class UpstreamCollector(Collector):
    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for deployment in self._router.deployments:
            if not isinstance(deployment, VllmDeployment) or not deployment.upstream_metrics:
                continue
            try:
                families = list(text_string_to_metric_families(deployment.upstream_metrics))
            except ValueError:
                continue  # a half-written scrape; the next one will do
            for family in families:
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    labels = {**sample.labels, "deployment": deployment.name}
                    target.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from merged.values()
