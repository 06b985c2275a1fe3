"""What a durable agent function's run records: one entry per primitive call, in call order.

An entry is written `started` before its primitive acts and `completed` (or `failed`) with its result after,
each before the function goes on. Its position (`seq`) is the order in which the function called its
primitives; `kind`, `name` and `fingerprint` (a digest of the call's input) say what was called. A replay
compares the call it sees at each position with the entry there: a mismatch is non-determinism.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

KINDS = ("model", "tool", "step", "approval", "sleep", "child")  # each fits steps.kind (8 characters)


class NonDeterminism(Exception):
    """The function, re-entered after a crash or a pause, called something other than what its journal holds."""


@dataclass
class Entry:
    seq: int
    kind: str
    name: str
    fingerprint: str | None  # None: recorded without one (the built-in agent's steps); only kind and name compared
    status: str = "started"  # started | completed | failed
    data: dict[str, Any] = field(default_factory=dict)  # what its start recorded (a wake-up time, a child run)
    output: Any = None
    error: str | None = None
    turn: int | None = None  # where the run's steps show it (default: `seq`); a tool call also by its call id
    call_id: str = ""

    @property
    def position(self) -> int:
        return self.seq if self.turn is None else self.turn

    @property
    def key(self) -> str:
        """The call's key (after the run id): its idempotency key, what a child run or an approval is found by."""
        return f"{self.position}:{self.call_id}" if self.call_id else str(self.position)

    @property
    def done(self) -> bool:
        return self.status != "started"


class Journal(Protocol):
    """Where a run's entries live. `load` returns them in `seq` order."""

    async def load(self) -> list[Entry]: ...

    async def start(self, entry: Entry) -> None: ...

    async def complete(self, entry: Entry) -> None: ...


class MemoryJournal:
    """A journal in a dict: for tests, and for what needs no durability. `writes` counts the writes made."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self.writes = 0

    async def load(self) -> list[Entry]:
        return [_copy(self.entries[seq]) for seq in sorted(self.entries)]

    async def start(self, entry: Entry) -> None:
        self.writes += 1
        self.entries[entry.seq] = _copy(entry)

    async def complete(self, entry: Entry) -> None:
        self.writes += 1
        self.entries[entry.seq] = _copy(entry)


def _copy(entry: Entry) -> Entry:
    # As a database would: what is stored is a JSON round trip of what was written, never the caller's objects.
    return Entry(
        entry.seq, entry.kind, entry.name, entry.fingerprint, entry.status,
        orjson.loads(orjson.dumps(entry.data)), orjson.loads(orjson.dumps(entry.output)), entry.error,
        entry.turn, entry.call_id,
    )  # fmt: skip


def fingerprint(value: Any) -> str:
    """A digest of a call's input, stable across processes (keys sorted)."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:
        raise TypeError(f"a durable call's input must be JSON-serialisable: {exc}") from None
    return hashlib.sha256(text).hexdigest()[:32]
