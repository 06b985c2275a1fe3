"""Idempotency keys at rest: only a keyed hash of a client's key is stored, never the key itself.

`ik1:<kid>:<hex>` is HMAC-SHA256 of the key under a key derived from encryption key `kid`, so the stored
value says nothing about the key (a client may well use something sensitive as one) and cannot be
confirmed by guessing without the encryption key. A lookup tries the hash under every key of the ring,
so runs created before a rotation are still found while their key stays in the ring, and the plain key
itself for rows from before keys were hashed (`hash_plaintext_keys` rewrites those at start). A database
opened without a keyring stores the key as it is, like every other column it would encrypt.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from sqlalchemy import select, update

from strata.security.encryption import Keyring
from strata.store.database import Database
from strata.store.tables import Run

LABEL = "strata idempotency key v1"
_HASHED = re.compile(r"ik1:[0-9A-Za-z_-]{1,64}:[0-9a-f]{64}")
_BATCH = 500


def stored_form(keyring: Keyring | None, key: str) -> str:
    """What `runs.idempotency_key` holds for `key`: its hash under the ring's current key."""
    return key if keyring is None else _hashed(keyring, keyring.current, key)


def lookup_forms(keyring: Keyring | None, key: str) -> list[str]:
    """Every value a run created with `key` may hold: its hash under each key of the ring, and the key
    itself when a row may predate hashing (unless it has the shape of a hash: then it is one)."""
    if keyring is None:
        return [key]
    forms = [_hashed(keyring, kid, key) for kid in sorted(keyring.kids, key=lambda kid: kid != keyring.current)]
    if not _HASHED.fullmatch(key):
        forms.append(key)
    return forms


def is_hashed(value: str) -> bool:
    return _HASHED.fullmatch(value) is not None


async def hash_plaintext_keys(db: Database) -> int:
    """Replace plaintext idempotency keys (rows from before hashing) with their hash; returns how many.
    Safe to run on every replica at once: a row is rewritten only while it still holds the plain key. Only
    rows not holding a hash are read, so once an install is converted this costs one scan at each start."""
    if db.keyring is None:
        return 0
    done, after = 0, ""
    while True:
        async with db.sessions() as tx:
            rows = (
                await tx.execute(
                    select(Run.id, Run.idempotency_key)
                    .where(Run.idempotency_key.is_not(None), ~Run.idempotency_key.startswith("ik1:"), Run.id > after)
                    .order_by(Run.id)
                    .limit(_BATCH)
                )
            ).all()
        if not rows:
            return done
        after = rows[-1][0]
        plain = [(run_id, key) for run_id, key in rows if not is_hashed(key)]
        if plain:
            async with db.transaction() as tx:
                for run_id, key in plain:
                    result = await tx.execute(
                        update(Run)
                        .where(Run.id == run_id, Run.idempotency_key == key)
                        .values(idempotency_key=stored_form(db.keyring, key))
                    )
                    done += int(result.rowcount or 0)


def _hashed(keyring: Keyring, kid: str, key: str) -> str:
    digest = hmac.new(keyring.subkey(LABEL, kid), key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return f"ik1:{kid}:{digest}"
