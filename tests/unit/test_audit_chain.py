"""The audit hash chain on in-memory rows: canonical JSON is stable, and verification names the first
row that was changed, deleted or reordered."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

from strata.security.audit import (
    GENESIS,
    AuditRecord,
    AuditRow,
    canonical_json,
    chain_hash,
    normalized,
    verify_chain,
)

TS = datetime(2024, 5, 17, 9, 30, 1, 123456, tzinfo=UTC)


def record(n: int = 0, **changes: object) -> AuditRecord:
    base = AuditRecord(
        action="auth.failed",
        outcome="failure",
        actor=f"user-{n}",
        actor_role="member",
        resource="key:abc",
        source_ip="10.0.0.1",
        request_id=f"req-{n}",
        details={"n": n, "reason": "bad key"},
        ts=TS + timedelta(seconds=n),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def chain(count: int) -> list[AuditRow]:
    rows, prev = [], GENESIS
    for n in range(1, count + 1):
        rec = normalized(record(n))
        digest = chain_hash(prev, rec)
        rows.append(AuditRow(id=n, record=rec, prev_hash=prev, hash=digest))
        prev = digest
    return rows


def test_canonical_json_is_sorted_compact_and_has_microsecond_utc_time() -> None:
    body = canonical_json(record(details={"b": 1, "a": [1, 2]}))
    assert b" " not in body.replace(b"bad key", b"")
    parsed = json.loads(body)
    assert list(parsed) == sorted(parsed)
    assert list(parsed["details"]) == ["a", "b"]
    assert parsed["ts"] == "2024-05-17T09:30:01.123456Z"
    assert canonical_json(record(ts=TS.replace(microsecond=0))).count(b'"ts":"2024-05-17T09:30:01.000000Z"') == 1


def test_canonical_json_ignores_key_order_and_timezone_representation() -> None:
    assert canonical_json(record(details={"a": 1, "b": 2})) == canonical_json(record(details={"b": 2, "a": 1}))
    naive = TS.replace(tzinfo=None)  # what SQLite gives back
    plus_two = TS.astimezone(timezone(timedelta(hours=2)))
    assert canonical_json(record(ts=naive)) == canonical_json(record()) == canonical_json(record(ts=plus_two))


def test_canonical_json_survives_a_json_round_trip_of_details() -> None:
    details = {"ratio": 0.1, "whole": 2.0, "big": 10**20, "tiny": 1e-300, "huge": 1e16, "nested": {"x": [1.5, 3]}}
    stored = normalized(record(details=details))
    # What a database hands back: the JSON text parsed again (and 1e16 may come back as an integer).
    back = json.loads(json.dumps(stored.details))
    assert canonical_json(replace(stored, details=back)) == canonical_json(stored)
    back["huge"] = 10**16
    back["whole"] = 2
    assert canonical_json(replace(stored, details=back)) == canonical_json(stored)


def test_chain_hash_is_sha256_of_prev_hash_and_canonical_json() -> None:
    rec = record()
    assert chain_hash(GENESIS, rec) == hashlib.sha256(GENESIS.encode() + canonical_json(rec)).hexdigest()
    assert chain_hash("1" * 64, rec) != chain_hash(GENESIS, rec)


def test_normalized_makes_a_storable_private_copy() -> None:
    details: dict[str, object] = {"when": TS, "tags": ("a", "b"), "nan": float("nan"), 7: "int key"}
    rec = normalized(record(actor="x" * 500 + "\x00", details=details, ts=TS.replace(tzinfo=None)))
    details["tags"] = "changed after recording"
    assert rec.details == {"when": "2024-05-17T09:30:01.123456Z", "tags": ["a", "b"], "nan": "nan", "7": "int key"}
    assert rec.actor == "x" * 160
    assert rec.ts.tzinfo is UTC
    assert normalized(rec) == rec  # idempotent


def test_normalized_strings_are_valid_utf8_for_every_database_and_encoder() -> None:
    rec = normalized(record(resource="/v1/\udcff", details={"path": "/a\ud800", "\udcfe": 1}))
    assert rec.resource == "/v1/?"
    assert rec.details == {"path": "/a?", "?": 1}
    canonical_json(rec).decode("ascii")


def test_default_timestamp_is_now_in_utc() -> None:
    rec = AuditRecord(action="config.reloaded", outcome="success", actor="system")
    assert rec.ts.tzinfo is not None and rec.ts.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - rec.ts) < timedelta(seconds=5)


def test_intact_chain_verifies() -> None:
    rows = chain(5)
    result = verify_chain(rows)
    assert result.ok and result.rows_checked == 5 and result.first_bad_id is None
    assert result.head_hash == rows[-1].hash
    assert verify_chain([]).ok


def test_a_changed_row_is_named() -> None:
    rows = chain(6)
    rows[3] = replace(rows[3], record=replace(rows[3].record, outcome="success"))
    result = verify_chain(rows)
    assert (result.ok, result.first_bad_id, result.problem) == (False, 4, "changed")
    assert "row 4" in result.message
    assert result.head_hash == rows[2].hash


def test_a_changed_prev_hash_or_hash_counts_as_changed() -> None:
    rows = chain(4)
    assert verify_chain([*rows[:2], replace(rows[2], hash="f" * 64), rows[3]]).first_bad_id == 3
    assert verify_chain([*rows[:2], replace(rows[2], prev_hash="f" * 64), rows[3]]).problem == "changed"


def test_a_deleted_row_is_named_by_its_successor_and_the_gap() -> None:
    rows = chain(6)
    del rows[2]  # row 3
    result = verify_chain(rows)
    assert (result.first_bad_id, result.problem) == (4, "deleted or reordered")
    assert "row 4" in result.message and "missing: row 3" in result.message


def test_deleting_the_first_row_is_detected() -> None:
    result = verify_chain(chain(3)[1:])
    assert (result.first_bad_id, result.problem) == (2, "deleted or reordered")
    assert "start of the chain" in result.message


def test_reordered_rows_are_named() -> None:
    rows = chain(6)
    # Swap the contents of rows 3 and 4 (ids stay where they are), as an UPDATE on the table would.
    third, fourth = rows[2], rows[3]
    rows[2] = replace(fourth, id=3)
    rows[3] = replace(third, id=4)
    result = verify_chain(rows)
    assert (result.first_bad_id, result.problem) == (3, "deleted or reordered")
    assert "row 3" in result.message


def test_a_row_rewritten_with_a_recomputed_hash_is_caught_at_the_next_row() -> None:
    rows = chain(5)
    forged = replace(rows[1].record, outcome="success")
    rows[1] = replace(rows[1], record=forged, hash=chain_hash(rows[1].prev_hash, forged))
    result = verify_chain(rows)
    assert (result.first_bad_id, result.problem) == (3, "deleted or reordered")
    assert "row 2 was rewritten" in result.message


def test_truncating_the_newest_rows_needs_the_head_hash_to_notice() -> None:
    rows = chain(5)
    truncated = verify_chain(rows[:3])
    assert truncated.ok  # the chain alone cannot tell
    assert truncated.head_hash != verify_chain(rows).head_hash  # an anchor kept elsewhere can


def test_exported_lines_read_back_and_verify() -> None:
    rows = chain(3)
    lines = [json.dumps(row.to_json()) for row in rows]
    assert verify_chain(AuditRow.from_json(json.loads(line)) for line in lines).ok
