"""The audit hash chain on in-memory rows: canonical JSON is stable, rows are HMAC-signed with a key derived
from the encryption keyring, and verification names the first row that was changed, recomputed, deleted or
reordered, and the rows truncated since a signed checkpoint."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from strata.security.audit import (
    GENESIS,
    Anchor,
    Anchors,
    AuditRecord,
    AuditRow,
    ChainKeys,
    canonical_json,
    chain_hash,
    keyed_hash,
    normalized,
    redacted,
    verify_chain,
)
from strata.security.audit_checkpoint import Checkpoint, append_checkpoint, read_anchors
from strata.security.encryption import Keyring
from strata.security.redaction import Redactor

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


OLD_KEY, KEY = secrets.token_bytes(32), secrets.token_bytes(32)
KEYS = ChainKeys(Keyring.from_keys(KEY, [OLD_KEY]))


def chain(count: int, keys: ChainKeys | None = KEYS, start: list[AuditRow] | None = None) -> list[AuditRow]:
    """`count` rows after `start`, signed with the ring's current key (`keys` None: unkeyed, as before 0006)."""
    rows = list(start or [])
    prev = rows[-1].hash if rows else GENESIS
    for n in range(len(rows) + 1, len(rows) + count + 1):
        rec = normalized(record(n))
        if keys is None:
            digest, kid = chain_hash(prev, rec), None
        else:
            digest, kid = keyed_hash(keys.chain_key(), keys.current, prev, rec), keys.current
        rows.append(AuditRow(id=n, record=rec, prev_hash=prev, hash=digest, kid=kid))
        prev = digest
    return rows


def recompute(rows: list[AuditRow], start: int, keyed: bool = True) -> list[AuditRow]:
    """What someone who can write the table but lacks the key does: plain SHA-256 from row `start` on."""
    out = rows[: start - 1]
    prev = out[-1].hash if out else GENESIS
    for row in rows[start - 1 :]:
        digest = chain_hash(prev, row.record)
        out.append(replace(row, prev_hash=prev, hash=digest, kid=row.kid if keyed else None))
        prev = digest
    return out


def anchored(*rows: AuditRow) -> Anchors:
    return Anchors(tuple(Anchor(row.id, row.hash, f"the checkpoint of row {row.id}") for row in rows), ("test",))


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


def test_keyed_hash_is_an_hmac_under_a_key_derived_from_the_encryption_key() -> None:
    rec = record()
    key = KEYS.chain_key()
    expected = hmac.new(key, f"{KEYS.current}\n{GENESIS}\n".encode() + canonical_json(rec), "sha256").hexdigest()
    assert keyed_hash(key, KEYS.current, GENESIS, rec) == expected
    assert key not in (KEY, OLD_KEY) and key != KEYS.checkpoint_key()  # one key per purpose, never the AES key
    assert ChainKeys(Keyring.from_keys(KEY)).chain_key() == key  # derived, so every replica with the key agrees
    (old_kid,) = KEYS.keyring.kids - {KEYS.current}
    assert keyed_hash(KEYS.chain_key(old_kid), old_kid, GENESIS, rec) != expected


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
    result = verify_chain(rows, KEYS)
    assert result.ok and result.rows_checked == 5 and result.first_bad_id is None
    assert result.head_hash == rows[-1].hash
    assert verify_chain([], KEYS).ok


def test_a_changed_row_is_named() -> None:
    rows = chain(6)
    rows[3] = replace(rows[3], record=replace(rows[3].record, outcome="success"))
    result = verify_chain(rows, KEYS)
    assert (result.ok, result.first_bad_id, result.problem) == (False, 4, "changed")
    assert "row 4" in result.message
    assert result.head_hash == rows[2].hash


def test_a_changed_prev_hash_or_hash_counts_as_changed() -> None:
    rows = chain(4)
    assert verify_chain([*rows[:2], replace(rows[2], hash="f" * 64), rows[3]], KEYS).first_bad_id == 3
    assert verify_chain([*rows[:2], replace(rows[2], prev_hash="f" * 64), rows[3]], KEYS).problem == "changed"


def test_a_deleted_row_is_named_by_its_successor_and_the_gap() -> None:
    rows = chain(6)
    del rows[2]  # row 3
    result = verify_chain(rows, KEYS)
    assert (result.first_bad_id, result.problem) == (4, "deleted or reordered")
    assert "row 4" in result.message and "missing: row 3" in result.message


def test_deleting_the_first_row_is_detected() -> None:
    result = verify_chain(chain(3)[1:], KEYS)
    assert (result.first_bad_id, result.problem) == (2, "deleted or reordered")
    assert "start of the chain" in result.message


def test_reordered_rows_are_named() -> None:
    rows = chain(6)
    # Swap the contents of rows 3 and 4 (ids stay where they are), as an UPDATE on the table would.
    third, fourth = rows[2], rows[3]
    rows[2] = replace(fourth, id=3)
    rows[3] = replace(third, id=4)
    result = verify_chain(rows, KEYS)
    assert (result.first_bad_id, result.problem) == (3, "deleted or reordered")
    assert "row 3" in result.message


def test_a_row_rewritten_with_a_recomputed_hash_is_caught() -> None:
    rows = chain(5)
    forged = replace(rows[1].record, outcome="success")
    rows[1] = replace(rows[1], record=forged, hash=chain_hash(rows[1].prev_hash, forged))
    result = verify_chain(rows, KEYS)
    assert (result.first_bad_id, result.problem) == (2, "recomputed")
    assert "row 2 was changed and its hash recomputed without the key" in result.message


def test_an_edit_with_every_later_hash_recomputed_is_caught_without_anchors() -> None:
    rows = chain(6)
    rows[2] = replace(rows[2], record=replace(rows[2].record, actor="someone else"))
    for keyed in (True, False):  # the key id kept, or dropped to pass the rows off as unkeyed ones
        result = verify_chain(recompute(rows, 3, keyed=keyed), KEYS)
        assert (result.ok, result.first_bad_id, result.problem) == (False, 3, "recomputed"), result.message
    assert "unkeyed but follows keyed row 1" in verify_chain(recompute(rows, 3, keyed=False), KEYS).message


def test_a_whole_chain_recomputed_unkeyed_is_caught_by_a_checkpoint() -> None:
    rows = chain(6)
    forged = recompute([replace(rows[0], record=replace(rows[0].record, outcome="success")), *rows[1:]], 1, False)
    assert verify_chain(forged, KEYS).ok  # an all-unkeyed chain is intact by itself...
    result = verify_chain(forged, KEYS, anchored(rows[3]))
    assert (result.ok, result.first_bad_id, result.problem) == (False, 4, "recomputed")  # ...not to a checkpoint
    assert "row 4 is not the row the checkpoint of row 4 signed" in result.message


def test_truncating_the_newest_rows_is_caught_by_a_checkpoint() -> None:
    rows = chain(5)
    assert verify_chain(rows[:3], KEYS).ok  # the chain alone cannot tell
    result = verify_chain(rows[:3], KEYS, anchored(rows[1], rows[4]))
    assert (result.ok, result.first_bad_id, result.problem) == (False, 4, "truncated")
    assert "ends at row 3, but the checkpoint of row 5 saw it reach row 5" in result.message
    assert "missing: row 4-5" in result.message
    emptied = verify_chain([], KEYS, anchored(rows[0]))
    assert (emptied.problem, emptied.first_bad_id) == ("truncated", 1) and "the chain is empty" in emptied.message
    grown = verify_chain(chain(2, start=rows), KEYS, anchored(rows[4]))
    assert grown.ok and grown.checkpoints == 1  # rows after the checkpoint are fine


def test_rows_written_after_a_truncation_do_not_hide_it() -> None:
    rows = chain(5)
    regrown, prev = rows[:3], rows[2].hash  # rows 4-5 deleted; the server goes on writing rows 4 and 5
    for n in (4, 5):
        rec = normalized(record(n, action="key.created"))
        digest = keyed_hash(KEYS.chain_key(), KEYS.current, prev, rec)
        regrown.append(AuditRow(id=n, record=rec, prev_hash=prev, hash=digest, kid=KEYS.current))
        prev = digest
    assert verify_chain(regrown, KEYS).ok
    result = verify_chain(regrown, KEYS, anchored(rows[4]))
    assert (result.ok, result.first_bad_id, result.problem) == (False, 5, "truncated")
    assert "rows from 5 on were deleted (truncated)" in result.message


def test_rows_signed_by_a_retired_key_verify_while_it_stays_in_the_ring() -> None:
    old_keys = ChainKeys(Keyring.from_keys(OLD_KEY))
    rows = chain(3, KEYS, chain(3, old_keys))  # rotated after row 3
    assert [row.kid for row in rows] == [old_keys.current] * 3 + [KEYS.current] * 3
    result = verify_chain(rows, KEYS)
    assert result.ok and result.key_ids == tuple(sorted({old_keys.current, KEYS.current}))
    new_only = verify_chain(rows, ChainKeys(Keyring.from_keys(KEY)))
    assert (new_only.first_bad_id, new_only.problem) == (1, "unverifiable")
    assert f"key {old_keys.current!r}, which is not in the keyring" in new_only.message
    without = verify_chain(rows)
    assert (without.problem, without.first_bad_id) == ("unverifiable", 1) and "no keyring" in without.message


def test_unkeyed_rows_from_before_are_checked_the_old_way_and_reported() -> None:
    rows = chain(3, KEYS, chain(4, None))
    result = verify_chain(rows, KEYS)
    assert result.ok and (result.legacy_rows, result.keyed_rows) == (4, 3)
    assert any("4 unkeyed rows" in line and "row 5" in line for line in result.checked)
    edited = [*rows[:1], replace(rows[1], record=replace(rows[1].record, outcome="success")), *rows[2:]]
    assert (verify_chain(edited, KEYS).first_bad_id, verify_chain(edited, KEYS).problem) == (2, "changed")
    # Rewriting an unkeyed row and recomputing the unkeyed ones after it breaks the first keyed row's link.
    forged = recompute(edited[:4], 2, keyed=False) + rows[4:]
    assert (verify_chain(forged, KEYS).first_bad_id, verify_chain(forged, KEYS).problem) == (5, "deleted or reordered")


def test_exported_lines_read_back_and_verify() -> None:
    rows = chain(3)
    lines = [json.dumps(row.to_json()) for row in rows]
    assert verify_chain((AuditRow.from_json(json.loads(line)) for line in lines), KEYS).ok
    assert [AuditRow.from_json(json.loads(line)).kid for line in lines] == [KEYS.current] * 3


def test_redacted_masks_credentials_in_every_field() -> None:
    secret = "sk-strata-" + "a1" * 16
    rec = redacted(record(resource=f"GET /v1/{secret}", details={"model": secret, "n": [secret]}), Redactor())
    assert secret not in canonical_json(rec).decode()
    assert rec.resource == "GET /v1/[REDACTED]" and rec.details == {"model": "[REDACTED]", "n": ["[REDACTED]"]}


def test_checkpoints_are_signed_and_read_back_from_a_file_or_a_log(tmp_path: Path) -> None:
    rows = chain(4)
    path = tmp_path / "checkpoints.jsonl"
    append_checkpoint(path, Checkpoint.sign(KEYS, 2, rows[1].hash, "replica-a"))
    append_checkpoint(path, Checkpoint.sign(KEYS, 4, rows[3].hash, "replica-a"))
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    log = tmp_path / "strata.log"  # the same checkpoint as a structured log line, among others
    line = json.loads(path.read_text().splitlines()[1])
    logged = json.dumps({"event": "audit checkpoint", "level": "info", **line})
    log.write_text(f'{{"event": "strata started"}}\nnot json\n{logged}\n')
    anchors = read_anchors([path, log, tmp_path / "missing.jsonl"], KEYS)
    assert [(a.head_id, a.head_hash) for a in anchors.anchors] == [(2, rows[1].hash), (4, rows[3].hash)]
    assert anchors.problems == () and anchors.sources[-1].endswith("(missing)")
    assert verify_chain(rows, KEYS, anchors).ok
    assert verify_chain(rows[:3], KEYS, anchors).problem == "truncated"


@pytest.mark.parametrize("field", ["head_id", "head_hash", "ts", "mac"])
def test_an_edited_or_forged_checkpoint_fails_the_verification(tmp_path: Path, field: str) -> None:
    rows = chain(3)
    path = tmp_path / "checkpoints.jsonl"
    good = Checkpoint.sign(KEYS, 3, rows[2].hash, "r")
    forged = {"head_id": 2, "head_hash": rows[1].hash, "ts": "2020-01-01T00:00:00Z", "mac": "0" * 64}
    edited = {**good.to_json(), field: forged[field]}
    path.write_text(json.dumps(edited) + "\n")
    anchors = read_anchors([path], KEYS)
    assert anchors.anchors == () and "fails authentication" in anchors.problems[0]
    result = verify_chain(rows, KEYS, anchors)
    assert (result.ok, result.problem) == (False, "bad checkpoint")


def test_a_checkpoint_signed_with_a_key_not_in_the_ring_is_a_problem(tmp_path: Path) -> None:
    rows = chain(3)
    path = tmp_path / "checkpoints.jsonl"
    stranger = ChainKeys(Keyring.from_keys(secrets.token_bytes(32)))
    append_checkpoint(path, Checkpoint.sign(stranger, 3, rows[2].hash, "r"))
    anchors = read_anchors([path], KEYS)
    assert f"signed with encryption key {stranger.current!r}, which is not in the keyring" in anchors.problems[0]
    assert verify_chain(rows, KEYS, anchors).problem == "bad checkpoint"


def test_checkpoints_that_disagree_about_a_row_are_a_problem_and_old_ones_are_thinned(tmp_path: Path) -> None:
    rows = chain(6)
    path = tmp_path / "checkpoints.jsonl"
    for row in rows:
        append_checkpoint(path, Checkpoint.sign(KEYS, row.id, row.hash, "r"))
    thinned = read_anchors([path], KEYS, limit=2)
    assert [a.head_id for a in thinned.anchors] == [5, 6] and thinned.problems == ()
    append_checkpoint(path, Checkpoint.sign(KEYS, 5, "e" * 64, "r"))  # row 5 written again after a cut
    anchors = read_anchors([path], KEYS)
    assert "signs another hash for row 5 than the checkpoint of" in anchors.problems[0]
    assert anchors.problems[0].startswith(f"{path}:7 ")
    assert verify_chain(rows, KEYS, anchors).problem == "bad checkpoint"
