"""Column types that encrypt values on their way into the database and decrypt them on the way out.

The keyring is attached to one engine's dialect object (`attach_keyring`) and read back from the
`dialect` argument SQLAlchemy hands every bind and result processor. It is not a module global: two
databases in one process (tests, a re-encryption tool next to a server) each keep their own keys, and
an engine with no keyring (`strata db upgrade`, tools that only migrate) writes plaintext as before.

Values written before encryption existed are read back unchanged, so no data migration is needed:
the columns keep their JSON / Text types, and `strata keys rotate-encryption` seals old rows later.
Only equality in Python works on these columns: SQL that filters on their contents would see ciphertext.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import JSON, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.types import TypeDecorator

from strata.security.encryption import EncryptionError, Keyring, is_envelope

_KEYRING_ATTR = "strata_keyring"
ENC_KEY = "$enc"  # an encrypted JSON value is stored as {"$enc": "<envelope>"}


def attach_keyring(engine: AsyncEngine, keyring: Keyring | None) -> None:
    setattr(engine.sync_engine.dialect, _KEYRING_ATTR, keyring)


def dialect_keyring(dialect: Dialect) -> Keyring | None:
    return getattr(dialect, _KEYRING_ATTR, None)


def _require(dialect: Dialect, label: str) -> Keyring:
    keyring = dialect_keyring(dialect)
    if keyring is None:
        raise EncryptionError(f"{label} holds encrypted data but this database was opened without a keyring")
    return keyring


class EncryptedJSON(TypeDecorator[Any]):
    """Any JSON value, sealed as `{"$enc": envelope}`; None stays None (nothing to hide)."""

    impl = JSON
    cache_ok = True
    hashable = False  # results are dicts and lists

    def __init__(self, label: str) -> None:
        super().__init__()
        # The label ("messages.data") is authenticated with each value, so ciphertext cannot be moved to
        # another column; it is a constant, not the column's name, so renaming a column breaks nothing.
        self.label = label

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        keyring = dialect_keyring(dialect)
        if value is None or keyring is None:
            return value
        plaintext = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        return {ENC_KEY: keyring.encrypt(plaintext, self.label.encode())}

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, dict) and len(value) == 1 and is_envelope(value.get(ENC_KEY)):
            return orjson.loads(_require(dialect, self.label).decrypt(value[ENC_KEY], self.label.encode()))
        return value  # plaintext written before encryption was enabled


class EncryptedText(TypeDecorator[str]):
    """A string, sealed as the envelope string itself."""

    impl = Text
    cache_ok = True

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label  # see EncryptedJSON

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        keyring = dialect_keyring(dialect)
        if value is None or keyring is None:
            return value
        return keyring.encrypt(value.encode(), self.label.encode())

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and is_envelope(value):
            return _require(dialect, self.label).decrypt(value, self.label.encode()).decode()
        return value
