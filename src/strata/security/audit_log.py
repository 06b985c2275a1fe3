"""The audit trail's background writer: request handlers record events without waiting for the database.

A `BatchWriter` (see `strata.store.batch_writer` for the whole policy, chosen so that no event is ever lost
silently): `record()` queues and returns; a task writes batches, one transaction each, retrying failed
writes in order; `stop()` writes everything still queued. Past `max_queue` waiting events it keeps
accepting (dropping an audit event is worse than using memory) and reports `overloaded`; past
`max_backlog` it raises `AuditBacklogFull`: the caller fails loudly (503) rather than the process growing
without limit. With a `Checkpointer`, the chain's head is signed and kept outside the database at start,
periodically, and at `stop()` once everything queued is written.
"""

from __future__ import annotations

from strata.security.audit import AuditRecord, canonical_json, normalized
from strata.security.audit_checkpoint import Checkpointer
from strata.store.audit import AuditStore
from strata.store.batch_writer import BacklogFull, BatchWriter


class AuditBacklogFull(BacklogFull):
    """More audit events wait than `max_backlog`: the database has been unwritable for too long."""


def _describe(record: AuditRecord) -> str:
    return canonical_json(normalized(record)).decode()


class AuditLog(BatchWriter[AuditRecord]):
    backlog_error = AuditBacklogFull

    def __init__(
        self,
        store: AuditStore,
        max_queue: int = 10_000,
        batch: int = 200,
        flush_interval_s: float = 0.2,
        *,
        max_backlog: int | None = None,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        super().__init__(
            store.append,
            name="audit",
            describe=_describe,
            max_queue=max_queue,
            batch=batch,
            flush_interval_s=flush_interval_s,
            max_backlog=max_backlog,
            overflow="raise",
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
        )
        self.store = store
        self.checkpointer = checkpointer

    async def start(self) -> None:
        await super().start()
        if self.checkpointer is not None:
            await self.checkpointer.start()

    async def stop(self, timeout_s: float = 30.0) -> None:
        await super().stop(timeout_s)
        if self.checkpointer is not None:
            await self.checkpointer.stop()

    def record(self, record: AuditRecord) -> None:
        """Queue an event; never blocks. Call it from the event loop's thread."""
        super().record(normalized(record))  # a copy: the caller may reuse its details dict
