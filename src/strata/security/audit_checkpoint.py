"""Signed checkpoints of the audit chain's head, kept outside the audit table.

The chain alone cannot show that its newest rows were deleted, nor that someone holding the key rebuilt it:
what is left is intact by itself. So every replica periodically, and when it stops, signs the head it sees
(row id and hash) with a key derived from the encryption keyring and appends it to a file in its data dir
(0600) and to its log (the `audit checkpoint` line, which a log pipeline ships off the machine).
`strata audit verify` reads them back (the file, or saved log lines) and checks that each signed row is
still there with the same hash: a chain that ends before a checkpoint was truncated; a row that differs
from one was recomputed.

With several replicas on one PostgreSQL database each keeps its own file of the one shared chain: any of
them proves what it saw. An attacker who can write the database but not the replicas' disks and logs
cannot hide a truncation; one who can also delete the checkpoints can hide only what happened after the
last checkpoint shipped off the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from strata.security.audit import Anchor, Anchors, ChainKeys
from strata.security.encryption import UnknownKeyError
from strata.security.file_modes import PRIVATE_FILE, tighten

if TYPE_CHECKING:
    from strata.config import StrataConfig
    from strata.store.audit import AuditStore

log = structlog.get_logger("strata.audit")
CHECKPOINT_FILE = "audit-checkpoints.jsonl"
LOG_EVENT = "audit checkpoint"
MAX_ANCHORS = 20_000  # the newest rows checkpointed that one verification compares (some two weeks of minutes)
_MAX_PROBLEMS = 20
_FIELDS = ("v", "ts", "head_id", "head_hash", "replica", "kid", "mac")


def checkpoint_file(config: StrataConfig) -> Path:
    return config.security.audit.checkpoint_file or config.data_dir / CHECKPOINT_FILE


@dataclass(frozen=True)
class Checkpoint:
    """Row `head_id` with hash `head_hash` was the chain's head at `ts`, as `replica` saw it; `mac` is an
    HMAC of the rest under the checkpoint key derived from encryption key `kid`."""

    ts: str
    head_id: int
    head_hash: str
    replica: str
    kid: str
    mac: str
    v: int = 1

    @classmethod
    def sign(cls, keys: ChainKeys, head_id: int, head_hash: str, replica: str) -> Checkpoint:
        ts = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
        unsigned = cls(ts, head_id, head_hash, replica, keys.current, mac="")
        return cls(ts, head_id, head_hash, replica, keys.current, unsigned._mac(keys))

    def authentic(self, keys: ChainKeys) -> bool:
        """`UnknownKeyError` if its key is not in the ring."""
        return hmac.compare_digest(self._mac(keys), self.mac)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint | None:
        """None for a line that is no checkpoint (a log file holds other lines too)."""
        if not all(name in data for name in _FIELDS):
            return None
        try:
            return cls(
                ts=str(data["ts"]),
                head_id=int(data["head_id"]),
                head_hash=str(data["head_hash"]),
                replica=str(data["replica"]),
                kid=str(data["kid"]),
                mac=str(data["mac"]),
                v=int(data["v"]),
            )
        except (TypeError, ValueError):
            return None

    def _mac(self, keys: ChainKeys) -> str:
        body = {k: v for k, v in self.to_json().items() if k != "mac"}
        message = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return hmac.new(keys.checkpoint_key(self.kid), message, sha256).hexdigest()


def append_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """One line, appended and synced; the file is created 0600 (and tightened if an older one is not)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = json.dumps(checkpoint.to_json(), separators=(",", ":")).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    try:
        os.write(fd, line)  # one write with O_APPEND: lines of replicas sharing the file never interleave
        os.fsync(fd)
    finally:
        os.close(fd)
    tighten(path, PRIVATE_FILE)


def read_anchors(paths: Iterable[Path], keys: ChainKeys | None, *, limit: int = MAX_ANCHORS) -> Anchors:
    """The authentic checkpoints in `paths` (checkpoint files or saved log files) as anchors for a verification.

    Lines that are not checkpoints are skipped. A problem: a checkpoint that fails authentication (edited or
    forged), whose key is not in the ring, or that signs another hash for a row than an earlier one did (the
    chain was cut back and written again in between, or restored from a backup). Files are read a line at a
    time and only the `limit` newest rows checkpointed are kept, so years of checkpoints cost bounded memory
    (the newest are what truncation is measured against; older rows are held by their HMACs and links)."""
    kept: dict[int, Anchor] = {}
    sources: list[str] = []
    problems: list[str] = []
    for path in paths:
        try:
            handle = path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            sources.append(f"{path} (missing)")
            continue
        sources.append(str(path))
        with handle:
            for number, line in enumerate(handle, start=1):
                checkpoint = _parse(line)
                if checkpoint is None:
                    continue
                anchor = Anchor(checkpoint.head_id, checkpoint.head_hash, f"the checkpoint of {checkpoint.ts} "
                                f"({path}:{number})")  # fmt: skip
                problem = _trust(checkpoint, keys, anchor, kept.get(checkpoint.head_id))
                if problem is not None:
                    if len(problems) < _MAX_PROBLEMS:
                        problems.append(f"{path}:{number} {problem}")
                    continue
                kept[anchor.head_id] = anchor
                if len(kept) > 2 * limit:
                    kept = _newest(kept, limit)
    return Anchors(tuple(_newest(kept, limit).values()), tuple(sources), tuple(problems))


def _trust(checkpoint: Checkpoint, keys: ChainKeys | None, anchor: Anchor, earlier: Anchor | None) -> str | None:
    """Why the checkpoint cannot serve as an anchor, or None."""
    if keys is None:
        return "cannot be authenticated: no encryption keyring is configured"
    try:
        if not checkpoint.authentic(keys):
            return "fails authentication: it was edited, or not written by Strata"
    except UnknownKeyError:
        return f"is signed with encryption key {checkpoint.kid!r}, which is not in the keyring"
    if earlier is not None and earlier.head_hash != anchor.head_hash:
        return (
            f"signs another hash for row {anchor.head_id} than {earlier.seen}: the chain was cut back and "
            "written again in between (or restored from a backup)"
        )
    return None


def _newest(anchors: dict[int, Anchor], limit: int) -> dict[int, Anchor]:
    return {head_id: anchors[head_id] for head_id in sorted(anchors)[-limit:]}


def _parse(line: str) -> Checkpoint | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return Checkpoint.from_json(data) if isinstance(data, dict) else None


class Checkpointer:
    """Signs the chain's head every `interval_s` (when it moved), at start and at stop."""

    def __init__(self, store: AuditStore, path: Path, interval_s: float, replica: str | None = None) -> None:
        self.store = store
        self.path = path
        self.interval_s = interval_s
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self._last: tuple[int, str] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._checkpoint_logged()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-checkpoints")

    async def stop(self) -> None:
        """Call after the audit writer has flushed: the last checkpoint covers every row this replica wrote."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._checkpoint_logged()

    async def checkpoint(self) -> Checkpoint | None:
        """Sign and keep the current head; None when the chain is empty, has not moved since the last one, or
        ends in a row Strata did not write (that is logged: someone forged it in the database)."""
        keys = self.store.keys
        head = await self.store.head()
        if keys is None or head is None or (head.id, head.hash) == self._last:
            return None
        problem = await self.store.head_problem(head)
        if problem is not None:
            if problem.startswith("forged"):
                log.error("the audit chain's newest row was not written by Strata: run `strata audit verify`",
                          row=head.id, problem=problem)  # fmt: skip
            else:
                log.warning("cannot checkpoint the audit chain's head", row=head.id, problem=problem)
            self._last = (head.id, head.hash)
            return None
        checkpoint = Checkpoint.sign(keys, head.id, head.hash, self.replica)
        log.info(LOG_EVENT, **checkpoint.to_json())  # first: with no writable disk, the log line is the checkpoint
        self._last = (head.id, head.hash)
        try:
            await asyncio.to_thread(append_checkpoint, self.path, checkpoint)
        except OSError as exc:
            log.warning("cannot append the audit checkpoint to its file", path=str(self.path), error=str(exc))
        return checkpoint

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._checkpoint_logged()

    async def _checkpoint_logged(self) -> None:
        try:
            await self.checkpoint()
        except Exception as exc:  # the database or the disk is away: the next round tries again
            log.warning("cannot write an audit checkpoint", error=repr(exc), path=str(self.path))
