"""`UsageMeter`: request handlers record usage without a database round trip; rows are written in batches.

It is a `BatchWriter` (see `strata.store.batch_writer` for the whole policy): `record()` queues and returns,
a background task writes a batch per transaction every `cost.usage_flush_interval_s` (or once
`cost.usage_batch` rows wait), failed writes are retried in order, and `stop()` writes everything still
queued. Past 10 x `usage_max_queue` waiting rows (the database down for long), a row goes to the error log
in full rather than memory, so memory stays bounded and no row is lost without a trace; a request is never
refused for metering's sake.
"""

from __future__ import annotations

import orjson

from strata.config import CostConfig
from strata.cost.records import UsageEvent
from strata.store.batch_writer import BatchWriter
from strata.store.usage import UsageStore


def _describe(event: UsageEvent) -> str:
    return orjson.dumps(event.to_json()).decode()


class UsageMeter(BatchWriter[UsageEvent]):
    def __init__(
        self,
        store: UsageStore,
        *,
        batch: int = 500,
        flush_interval_s: float = 1.0,
        max_queue: int = 20_000,
        max_backlog: int | None = None,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> None:
        super().__init__(
            store.append,
            name="usage",
            describe=_describe,
            max_queue=max_queue,
            batch=batch,
            flush_interval_s=flush_interval_s,
            max_backlog=max_backlog,
            overflow="log",
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
        )
        self.store = store

    @classmethod
    def from_config(cls, config: CostConfig, store: UsageStore) -> UsageMeter:
        return cls(
            store,
            batch=config.usage_batch,
            flush_interval_s=config.usage_flush_interval_s,
            max_queue=config.usage_max_queue,
        )
