"""Audit records and their hash chain: what an event is, how it is hashed, how a chain is checked.

Each stored row holds `prev_hash` (the row before it, or GENESIS) and `hash = sha256(prev_hash +
canonical_json(record))`. Editing a row breaks its own hash ("changed"); deleting or reordering rows
breaks the link to the row before ("deleted or reordered"). Truncating the newest rows is invisible to
the chain alone: compare `VerifyResult.head_hash` with a copy kept elsewhere (an export, a log line).

What is hashed must come back bit-identical from SQLite and PostgreSQL, so `canonical_json` treats a
naive timestamp as UTC (SQLite drops the zone), writes it with microseconds (both keep exactly that),
and writes integral floats as integers (2.0 and 2 are one JSON number to every database).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any, Literal

GENESIS = "0" * 64
Outcome = Literal["success", "failure", "denied"]
Problem = Literal["changed", "deleted or reordered"]
# Column widths of `audit_events`: longer values are cut before hashing, so PostgreSQL never rejects a row
# (which would stall the writer) and what is hashed is exactly what is stored.
_WIDTHS = {
    "actor": 160,
    "actor_role": 16,
    "action": 64,
    "resource": 256,
    "outcome": 16,
    "source_ip": 64,
    "request_id": 64,
}


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AuditRecord:
    """One security-relevant event: who did what to which resource, when, from where, and the outcome."""

    action: str  # "auth.failed", "key.created", "key.revoked", "key.rotated", "model.deployed", ...
    outcome: Outcome
    actor: str
    actor_role: str | None = None
    resource: str | None = None
    source_ip: str | None = None
    request_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    ts: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class AuditRow:
    """A stored record with its place in the chain."""

    id: int
    record: AuditRecord
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        """One JSON Lines object: every column, the timestamp as it is hashed."""
        r = self.record
        return {
            "id": self.id,
            "ts": _ts(r.ts),
            "actor": r.actor,
            "actor_role": r.actor_role,
            "action": r.action,
            "resource": r.resource,
            "outcome": r.outcome,
            "source_ip": r.source_ip,
            "request_id": r.request_id,
            "details": r.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditRow:
        """Read an exported line back, so an export can be verified away from the database."""
        record = AuditRecord(
            action=data["action"],
            outcome=data["outcome"],
            actor=data["actor"],
            actor_role=data["actor_role"],
            resource=data["resource"],
            source_ip=data["source_ip"],
            request_id=data["request_id"],
            details=data["details"],
            ts=datetime.fromisoformat(data["ts"]),
        )
        return cls(id=data["id"], record=record, prev_hash=data["prev_hash"], hash=data["hash"])


def normalized(record: AuditRecord) -> AuditRecord:
    """The record as it will be stored: UTC time, strings fit their columns, details a private JSON copy.

    Applied when an event is recorded (so a caller mutating its dict later cannot change the event) and
    again before it is hashed; it is idempotent. Never applied to rows read back: that would hide edits.
    """
    cut = {name: _fit(getattr(record, name), width) for name, width in _WIDTHS.items()}
    return replace(record, **cut, ts=_utc(record.ts), details=_jsonable(record.details or {}, clean=True))


def canonical_json(record: AuditRecord) -> bytes:
    """Sorted keys, no whitespace, ASCII only: the same bytes for the same event on every database."""
    body = {
        "action": record.action,
        "actor": record.actor,
        "actor_role": record.actor_role,
        "details": _jsonable(record.details),
        "outcome": record.outcome,
        "request_id": record.request_id,
        "resource": record.resource,
        "source_ip": record.source_ip,
        "ts": _ts(record.ts),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def chain_hash(prev_hash: str, record: AuditRecord) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_json(record)).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows_checked: int  # rows read, the bad one included
    first_bad_id: int | None
    problem: Problem | None
    message: str
    head_hash: str  # hash of the last intact row: keep it elsewhere to detect truncation later


class ChainVerifier:
    """Checks rows one at a time in id order, so a table of any size is verified in constant memory."""

    def __init__(self) -> None:
        self.rows_checked = 0
        self.head_hash = GENESIS
        self._prev_id: int | None = None
        self.failure: VerifyResult | None = None

    def feed(self, row: AuditRow) -> bool:
        """False once the chain is broken (the failure is kept); later rows are ignored."""
        if self.failure is not None:
            return False
        self.rows_checked += 1
        # A row whose own hash is wrong was edited (content, prev_hash or hash). Only a row that is intact
        # by itself but does not point at the row before shows that rows went missing or moved.
        if chain_hash(row.prev_hash, row.record) != row.hash:
            self._fail(row.id, "changed", f"row {row.id} was changed: its hash does not match its content")
        elif row.prev_hash != self.head_hash:
            self._fail(row.id, "deleted or reordered", self._link_message(row))
        else:
            self.head_hash = row.hash
            self._prev_id = row.id
        return self.failure is None

    def result(self) -> VerifyResult:
        if self.failure is not None:
            return self.failure
        message = f"audit chain intact: {self.rows_checked} rows, head {self.head_hash}"
        return VerifyResult(True, self.rows_checked, None, None, message, self.head_hash)

    def _link_message(self, row: AuditRow) -> str:
        before = "the start of the chain" if self._prev_id is None else f"row {self._prev_id}"
        message = f"row {row.id} does not follow {before}: a row was deleted or rows were reordered"
        first_missing = 1 if self._prev_id is None else self._prev_id + 1
        if row.id > first_missing:  # ids are dense (the store assigns them), so a gap is where rows went
            gap = str(first_missing) if row.id == first_missing + 1 else f"{first_missing}-{row.id - 1}"
            message += f" (missing: row {gap})"
        elif self._prev_id is not None:
            message += f", or row {self._prev_id} was rewritten with a recomputed hash"
        return message

    def _fail(self, row_id: int, problem: Problem, message: str) -> None:
        self.failure = VerifyResult(False, self.rows_checked, row_id, problem, message, self.head_hash)


def verify_chain(rows: Iterable[AuditRow]) -> VerifyResult:
    """Check rows given in id order; report the first one that was changed, deleted or reordered."""
    verifier = ChainVerifier()
    for row in rows:
        if not verifier.feed(row):
            break
    return verifier.result()


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _ts(ts: datetime) -> str:
    return _utc(ts).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _fit(value: str | None, width: int) -> str | None:
    # PostgreSQL text holds neither NUL nor lone surrogates (a decoded path may carry them): a value the
    # database refuses would stall the writer. What is cut here is exactly what is stored and hashed.
    if value is None:
        return None
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")[:width]


def _jsonable(value: Any, clean: bool = False) -> Any:
    """Plain JSON that survives a database round trip unchanged (a deep copy).

    `clean` (when recording, never when verifying) also makes strings valid UTF-8, so that no encoder
    downstream (an export, an API response) can fail on a lone surrogate.
    """
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8") if clean else value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # "nan", "inf": JSON has no such numbers
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {_jsonable(str(k), clean): _jsonable(v, clean) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, clean) for v in value]
    if isinstance(value, set | frozenset):  # no order of its own: sort, so the same set hashes the same
        return sorted((_jsonable(v, clean) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, datetime):
        return _ts(value)
    if isinstance(value, date):
        return value.isoformat()
    return _jsonable(str(value), clean)
