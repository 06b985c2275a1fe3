"""Audit records and their keyed hash chain: what an event is, how it is signed, how a chain is checked.

Each stored row holds `prev_hash` (the row before it, or GENESIS), the id of the encryption key that signed
it (`kid`) and `hash = HMAC-SHA256(K_kid, kid + prev_hash + canonical_json(record))`, where K_kid is derived
from that encryption key (`ChainKeys`): it is never in the database, so someone who can write the table
can neither edit a row nor recompute the hashes after an edit without the change showing. Editing a row
breaks its own MAC ("changed"; "recomputed" when its hash is a plain SHA-256 made without the key);
deleting or reordering rows breaks the link to the row before ("deleted or reordered"). Deleting the
newest rows leaves a shorter chain that is intact by itself: signed checkpoints of the head kept outside
the table (`Anchor`s, see `audit_checkpoint`) show it ("truncated"), and show a chain recomputed from its
first row on ("recomputed").

Rows written before the chain was keyed have no `kid` and `hash = sha256(prev_hash + canonical_json)`;
they are checked that way and reported as unkeyed. They can only come first: the first keyed row signs
their head, and an unkeyed row after a keyed one means the chain was recomputed.

What is hashed must come back bit-identical from SQLite and PostgreSQL, so `canonical_json` treats a
naive timestamp as UTC (SQLite drops the zone), writes it with microseconds (both keep exactly that),
and writes integral floats as integers (2.0 and 2 are one JSON number to every database).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any, Literal

from strata.security.encryption import Keyring, UnknownKeyError
from strata.security.redaction import Redactor

GENESIS = "0" * 64
Outcome = Literal["success", "failure", "denied"]
Problem = Literal["changed", "recomputed", "deleted or reordered", "truncated", "unverifiable", "bad checkpoint"]
CHAIN_LABEL = "strata audit chain v1"  # HKDF labels: each purpose gets its own key from an encryption key
CHECKPOINT_LABEL = "strata audit checkpoint v1"
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
    """A stored record with its place in the chain; `kid` None: an unkeyed row from before the chain was keyed."""

    id: int
    record: AuditRecord
    prev_hash: str
    hash: str
    kid: str | None = None

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
            "kid": self.kid,
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
        return cls(id=data["id"], record=record, prev_hash=data["prev_hash"], hash=data["hash"], kid=data.get("kid"))


def normalized(record: AuditRecord) -> AuditRecord:
    """The record as it will be stored: UTC time, strings fit their columns, details a private JSON copy.

    Applied when an event is recorded (so a caller mutating its dict later cannot change the event) and
    again before it is hashed; it is idempotent. Never applied to rows read back: that would hide edits.
    """
    cut = {name: _fit(getattr(record, name), width) for name, width in _WIDTHS.items()}
    return replace(record, **cut, ts=_utc(record.ts), details=_jsonable(record.details or {}, clean=True))


def redacted(record: AuditRecord, redactor: Redactor) -> AuditRecord:
    """Credentials masked in every string (a key pasted into a URL path or a request id), before hashing."""
    texts = {name: redactor.value(getattr(record, name)) for name in _WIDTHS}
    return replace(record, **texts, details=redactor.value(record.details))


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
    """The unkeyed hash of rows written before the chain was keyed (and of a forger without the key)."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_json(record)).hexdigest()


def keyed_hash(key: bytes, kid: str, prev_hash: str, record: AuditRecord) -> str:
    message = b"%s\n%s\n%s" % (kid.encode("ascii"), prev_hash.encode("ascii"), canonical_json(record))
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class ChainKeys:
    """The audit chain's HMAC keys, derived from the encryption keyring: the current key signs new rows and
    checkpoints, and every key the ring still holds checks what it signed (so rotation loses nothing as
    long as retired keys stay in the ring)."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    @property
    def current(self) -> str:
        return self.keyring.current

    def chain_key(self, kid: str | None = None) -> bytes:
        return self.keyring.subkey(CHAIN_LABEL, kid)

    def checkpoint_key(self, kid: str | None = None) -> bytes:
        return self.keyring.subkey(CHECKPOINT_LABEL, kid)


@dataclass(frozen=True)
class Anchor:
    """A chain head seen and signed earlier, kept outside the table (a checkpoint): row `head_id` must
    still be there with exactly this hash."""

    head_id: int
    head_hash: str
    seen: str  # for messages: "the checkpoint of 2025-01-02T03:04:05Z (strata-data/audit-checkpoints.jsonl)"


@dataclass(frozen=True)
class Anchors:
    """What the checkpoints read for a verification gave: authentic heads, and what could not be trusted."""

    anchors: tuple[Anchor, ...] = ()
    sources: tuple[str, ...] = ()  # the files read
    problems: tuple[str, ...] = ()  # lines that fail authentication: an edited or forged checkpoint


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows_checked: int  # rows read, the bad one included
    first_bad_id: int | None
    problem: Problem | None
    message: str
    head_hash: str  # hash of the last intact row
    head_id: int = 0  # id of the last intact row (0: none)
    keyed_rows: int = 0  # rows checked with their key's HMAC
    legacy_rows: int = 0  # unkeyed rows from before the chain was keyed, checked as plain SHA-256
    key_ids: tuple[str, ...] = ()  # the keys that signed the rows checked
    checkpoints: int = 0  # authentic checkpoints compared with the chain
    checked: tuple[str, ...] = ()  # what was checked and what that proves, one sentence each


class ChainVerifier:
    """Checks rows one at a time in id order, so a table of any size is verified in constant memory.

    `keys` None: no keyring (keyed rows cannot be checked: "unverifiable"). `anchors`: checkpoints of the
    head taken earlier; a row that differs from one, or a chain that ends before one, fails."""

    def __init__(self, keys: ChainKeys | None = None, anchors: Anchors | None = None) -> None:
        self.keys = keys
        self.anchors = anchors or Anchors()
        self.rows_checked = 0
        self.head_hash = GENESIS
        self.keyed_rows = 0
        self.legacy_rows = 0
        self._kids: set[str] = set()
        self._prev_id: int | None = None
        self._first_keyed: int | None = None
        self._expected: dict[int, Anchor] = {}
        for anchor in self.anchors.anchors:  # the newest sighting of each row is the one to name
            self._expected[anchor.head_id] = anchor
        self.failure: VerifyResult | None = None

    def feed(self, row: AuditRow) -> bool:
        """False once the chain is broken (the failure is kept); later rows are ignored."""
        if self.failure is not None:
            return False
        self.rows_checked += 1
        # A row whose own hash is wrong was edited (content, prev_hash or hash). Only a row that is intact
        # by itself but does not point at the row before shows that rows went missing or moved.
        if not self._intact(row):
            return False
        if row.prev_hash != self.head_hash:
            self._fail(row.id, "deleted or reordered", self._link_message(row))
            return False
        anchor = self._expected.get(row.id)
        if anchor is not None and anchor.head_hash != row.hash:
            if row.kid is None:  # rows a forger without the key can make
                problem: Problem = "recomputed"
                message = "the chain was rewritten up to here and its hashes recomputed without the key"
            else:  # signed rows, so written by Strata after the rows the checkpoint saw were taken away
                problem = "truncated"
                message = (
                    f"rows from {row.id} on were deleted (truncated) and new rows written after the cut, or "
                    "someone holding the encryption key rewrote the chain"
                )
            self._fail(row.id, problem, f"row {row.id} is not the row {anchor.seen} signed: {message}")
            return False
        self.head_hash = row.hash
        self._prev_id = row.id
        return True

    def result(self) -> VerifyResult:
        if self.failure is not None:
            return self.failure
        head_id = self._prev_id or 0
        beyond = [a for a in self._expected.values() if a.head_id > head_id]
        if beyond:
            newest = max(beyond, key=lambda a: a.head_id)
            gone = str(head_id + 1) if newest.head_id == head_id + 1 else f"{head_id + 1}-{newest.head_id}"
            ends = f"ends at row {head_id}" if head_id else "is empty"
            self._fail(
                head_id + 1,
                "truncated",
                f"the chain {ends}, but {newest.seen} saw it reach row {newest.head_id}: "
                f"the newest rows were deleted (missing: row {gone})",
            )
            return self.failure  # type: ignore[return-value]
        if self.anchors.problems:
            self._fail(None, "bad checkpoint", f"a checkpoint cannot be trusted: {self.anchors.problems[0]}")
            return self.failure  # type: ignore[return-value]
        message = f"audit chain intact: {self.rows_checked} rows, head {self.head_hash}"
        return self._result(True, None, None, message)

    def _intact(self, row: AuditRow) -> bool:
        if row.kid is None:
            if self._first_keyed is not None:
                self._fail(
                    row.id,
                    "recomputed",
                    f"row {row.id} is unkeyed but follows keyed row {self._first_keyed}: the chain was "
                    f"recomputed without the key from row {row.id} or earlier",
                )
                return False
            if chain_hash(row.prev_hash, row.record) != row.hash:
                self._fail(row.id, "changed", f"row {row.id} was changed: its hash does not match its content")
                return False
            self.legacy_rows += 1
            return True
        key = self._key(row)
        if key is None:
            return False
        if not hmac.compare_digest(keyed_hash(key, row.kid, row.prev_hash, row.record), row.hash):
            if chain_hash(row.prev_hash, row.record) == row.hash:
                self._fail(
                    row.id,
                    "recomputed",
                    f"row {row.id} was changed and its hash recomputed without the key: it is a plain SHA-256, "
                    f"not the HMAC of key {row.kid!r}",
                )
            else:
                self._fail(
                    row.id,
                    "changed",
                    f"row {row.id} was changed: its hash is not the HMAC of its content under key {row.kid!r}",
                )
            return False
        self.keyed_rows += 1
        self._kids.add(row.kid)
        if self._first_keyed is None:
            self._first_keyed = row.id
        return True

    def _key(self, row: AuditRow) -> bytes | None:
        assert row.kid is not None
        if self.keys is None:
            self._fail(
                row.id,
                "unverifiable",
                f"row {row.id} is signed with encryption key {row.kid!r}, but no keyring is configured: "
                "set STRATA_ENCRYPTION_KEY or security.encryption.key_file as the server has them",
            )
            return None
        try:
            return self.keys.chain_key(row.kid)
        except UnknownKeyError:
            self._fail(
                row.id,
                "unverifiable",
                f"row {row.id} is signed with encryption key {row.kid!r}, which is not in the keyring "
                f"({', '.join(sorted(self.keys.keyring.kids))}): keep retired keys in STRATA_ENCRYPTION_OLD_KEYS "
                "or the key file to verify the rows they signed",
            )
            return None

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

    def _fail(self, row_id: int | None, problem: Problem, message: str) -> None:
        self.failure = self._result(False, row_id, problem, message)

    def _result(self, ok: bool, row_id: int | None, problem: Problem | None, message: str) -> VerifyResult:
        return VerifyResult(
            ok,
            self.rows_checked,
            row_id,
            problem,
            message,
            self.head_hash,
            head_id=self._prev_id or 0,
            keyed_rows=self.keyed_rows,
            legacy_rows=self.legacy_rows,
            key_ids=tuple(sorted(self._kids)),
            checkpoints=len(self.anchors.anchors),
            checked=self._checked(),
        )

    def _checked(self) -> tuple[str, ...]:
        lines = []
        if self.keyed_rows:
            lines.append(
                f"{self.keyed_rows} keyed rows: HMAC-SHA256 under encryption key(s) {', '.join(sorted(self._kids))}, "
                "so an edit, or hashes recomputed without the key, is detected"
            )
        if self.legacy_rows:
            sealed = (
                f"the first keyed row (row {self._first_keyed}) signs their head, so rewriting them shows there"
                if self._first_keyed is not None
                else "no keyed row follows them yet, so a rewrite with recomputed hashes would not show"
            )
            lines.append(
                f"{self.legacy_rows} unkeyed rows from before the chain was keyed: plain SHA-256, which shows "
                f"accidental damage; {sealed}"
            )
        lines.append("links: every row follows the one before, so a row deleted or moved inside the chain is detected")
        anchors = self.anchors
        if anchors.anchors:
            newest = max(anchors.anchors, key=lambda a: a.head_id)
            lines.append(
                f"{len(anchors.anchors)} signed checkpoints of the head ({', '.join(anchors.sources)}; newest: row "
                f"{newest.head_id}): deleting the newest rows or recomputing the chain since then is detected"
            )
        else:
            where = ", ".join(anchors.sources) or "none given"
            lines.append(
                f"no checkpoints ({where}): deleting the newest rows would not be detected; keep the checkpoint "
                "file, or the `audit checkpoint` log lines, to detect it"
            )
        return tuple(lines)


def verify_chain(
    rows: Iterable[AuditRow], keys: ChainKeys | None = None, anchors: Anchors | None = None
) -> VerifyResult:
    """Check rows given in id order; report the first one that was changed, deleted or reordered."""
    verifier = ChainVerifier(keys, anchors)
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
