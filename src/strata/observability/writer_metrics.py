"""Prometheus view of the background writers (usage, audit, spans), read at scrape time: rows the database
refused for their content, which each writer set aside so that the rest of the batch, and every batch after it,
was still written."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class RejectedRowsCollector(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "strata_rows_rejected",
            "Rows a background writer set aside because the database refused their content (a NUL character, "
            "a lone surrogate): usage and audit rows go to the error log in full, spans are dropped.",
            labels=["writer"],
        )
        for writer, count in sorted(self._counts().items()):
            family.add_metric([writer], count)
        yield family
