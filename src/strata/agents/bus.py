"""In-process fan-out of run events to live subscribers (SSE, WebSocket, sync waiters).

Durable events are read back from the store, so a slow subscriber that overflows its queue loses
nothing but token deltas; the queue mostly serves as a wake-up. Other replicas' events are found by
the subscribers' periodic store reads.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from strata.store.runs import StoredEvent

QUEUE_SIZE = 1024


@dataclass(frozen=True)
class LiveEvent:
    run_id: str
    type: str
    data: dict[str, Any]
    seq: int | None  # None: ephemeral (token deltas), never stored


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[LiveEvent]]] = defaultdict(set)

    def publish(self, event: LiveEvent) -> None:
        for queue in self._subscribers.get(event.run_id, ()):
            try:  # noqa: SIM105 - cheaper than contextlib.suppress on every token delta
                queue.put_nowait(event)
            except asyncio.QueueFull:
                pass  # the subscriber re-reads stored events; only deltas are lost

    def publish_stored(self, event: StoredEvent) -> None:
        self.publish(LiveEvent(event.run_id, event.type, event.data, event.seq))

    def subscribe(self, run_id: str) -> Subscription:
        """Registered at once (not on `with`), so a caller can subscribe before a run starts."""
        return Subscription(self, run_id)

    def _add(self, run_id: str, queue: asyncio.Queue[LiveEvent]) -> None:
        self._subscribers[run_id].add(queue)

    def _remove(self, run_id: str, queue: asyncio.Queue[LiveEvent]) -> None:
        subscribers = self._subscribers.get(run_id)
        if subscribers is not None:
            subscribers.discard(queue)
            if not subscribers:
                del self._subscribers[run_id]


class Subscription:
    """A run's live events; use as a context manager (or call `close()`) to stop receiving them."""

    def __init__(self, bus: EventBus, run_id: str) -> None:
        self._bus = bus
        self.run_id = run_id
        self.queue: asyncio.Queue[LiveEvent] = asyncio.Queue(QUEUE_SIZE)
        bus._add(run_id, self.queue)

    def close(self) -> None:
        self._bus._remove(self.run_id, self.queue)

    def __enter__(self) -> asyncio.Queue[LiveEvent]:
        return self.queue

    def __exit__(self, *exc: object) -> None:
        self.close()
