"""Encryption at rest: an AES-256-GCM keyring and where its keys come from.

Every encrypted value is a self-describing envelope, `enc:v1:<kid>:<base64url(nonce + ciphertext + tag)>`,
so a record names the key that sealed it: keys can be rotated and old records still read.
A key id is the first 8 hex characters of the key's SHA-256, so the same key has the same id whether it
comes from the environment or from a key file (moving a key between the two needs no re-encryption).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from strata.config import StrataConfig

ENV_KEY = "STRATA_ENCRYPTION_KEY"
ENV_OLD_KEYS = "STRATA_ENCRYPTION_OLD_KEYS"
KEY_BYTES = 32
_NONCE_BYTES = 12
_PREFIX = "enc:v1:"
_ENVELOPE = re.compile(r"enc:v1:([0-9A-Za-z_-]{1,64}):([0-9A-Za-z_-]{38,})")  # 38 chars >= nonce + tag
_RELOAD_INTERVAL_S = 5.0


class EncryptionError(Exception):
    """A value could not be sealed or opened, or the key configuration is unusable."""


class UnknownKeyError(EncryptionError):
    """The envelope names a key that is not in the keyring."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def is_envelope(value: object) -> bool:
    return isinstance(value, str) and _ENVELOPE.fullmatch(value) is not None


def envelope_kid(value: str) -> str | None:
    match = _ENVELOPE.fullmatch(value)
    return match.group(1) if match else None


class Keyring:
    """AES-256 keys by key id; `current` seals new records, every key opens the records it sealed.

    With `reload`, a record sealed by a key this ring has not seen (another process rotated the shared
    key file) makes it re-read its source once, at most every few seconds, instead of failing the read.

    `subkey` derives keys for other purposes (the audit chain's HMAC, idempotency-key hashes) from the same
    keys, so they live wherever the encryption keys live and never in the database.
    """

    def __init__(self, keys: Mapping[str, bytes], current: str, reload: Callable[[], Keyring] | None = None) -> None:
        if current not in keys:
            raise EncryptionError(f"current key {current!r} is not in the keyring")
        for kid, key in keys.items():
            if len(key) != KEY_BYTES:
                raise EncryptionError(f"key {kid!r} is {len(key)} bytes; AES-256 needs exactly {KEY_BYTES}")
        self._keys = dict(keys)
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}
        self._subkeys: dict[tuple[str, str], bytes] = {}
        self.current = current
        self._reload = reload
        self._reloaded_at = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def from_keys(cls, current: bytes, others: Iterable[bytes] = ()) -> Keyring:
        keys = {key_id(key): key for key in others}
        keys[key_id(current)] = current
        return cls(keys, key_id(current))

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._ciphers)

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)  # random 96-bit nonce: never reused under one key in practice
        sealed = self._ciphers[self.current].encrypt(nonce, plaintext, aad)
        return f"{_PREFIX}{self.current}:{_b64encode(nonce + sealed)}"

    def decrypt(self, envelope: str, aad: bytes = b"") -> bytes:
        match = _ENVELOPE.fullmatch(envelope)
        if match is None:
            raise EncryptionError("value is not an encryption envelope (enc:v1:<kid>:<data>)")
        kid, body = match.groups()
        cipher = self._ciphers.get(kid)
        if cipher is None:
            self._reloaded(kid)  # replaces the dicts: read them after it
            cipher = self._ciphers[kid]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return cipher.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], aad)
        except (InvalidTag, binascii.Error, ValueError):
            raise EncryptionError(f"a record sealed with key {kid!r} failed authentication (tampered?)") from None

    def subkey(self, label: str, kid: str | None = None) -> bytes:
        """A 32-byte key for `label`'s purpose, HKDF-SHA256 from key `kid` (default: the current one).

        Each label gives an unrelated key, so a MAC key never doubles as an encryption key. `UnknownKeyError`
        if `kid` is not in the ring (after one reload, as for `decrypt`)."""
        kid = self.current if kid is None else kid
        cached = self._subkeys.get((label, kid))
        if cached is None:
            if kid not in self._keys:
                self._reloaded(kid)
            hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label.encode())
            cached = self._subkeys[(label, kid)] = hkdf.derive(self._keys[kid])
        return cached

    def _reloaded(self, kid: str) -> None:
        """Make sure `kid` is in the ring, re-reading the key file once if it is not; else `UnknownKeyError`."""
        with self._lock:
            if kid not in self._keys and self._reload and time.monotonic() - self._reloaded_at > _RELOAD_INTERVAL_S:
                self._reloaded_at = time.monotonic()
                fresh = self._reload()
                # Adopt new keys only: what this ring seals with stays put until the process restarts.
                self._keys = {**fresh._keys, **self._keys}
                self._ciphers = {**fresh._ciphers, **self._ciphers}
        if kid not in self._keys:
            raise UnknownKeyError(
                f"encryption key {kid!r} is not configured (this ring has {', '.join(sorted(self._keys))}); "
                f"add it to {ENV_OLD_KEYS} or restore it in the key file"
            )


@dataclass(frozen=True)
class KeyringSource:
    """A loaded keyring and what the caller should tell the operator about it."""

    keyring: Keyring
    origin: str  # "environment" or the key file's path, for log lines
    key_file: Path | None = None  # set when the keys came from a file (rotation rewrites it)
    created_file: Path | None = None  # set when this call created the key file
    warnings: tuple[str, ...] = ()  # for the log, e.g. a key file readable by other users


def default_key_file(config: StrataConfig) -> Path:
    return config.security.encryption.key_file or config.data_dir / "encryption.keys"


def load_keyring(config: StrataConfig, environ: Mapping[str, str], *, create: bool = True) -> KeyringSource:
    """The keyring from STRATA_ENCRYPTION_KEY, else the key file (created for the embedded SQLite default,
    unless `create` is False: a tool that only reads, such as `strata audit verify`, must not make up a key)."""
    if environ.get(ENV_KEY, "").strip():
        current = decode_key(environ[ENV_KEY], ENV_KEY)
        old = [decode_key(k, ENV_OLD_KEYS) for k in environ.get(ENV_OLD_KEYS, "").split(",") if k.strip()]
        return KeyringSource(Keyring.from_keys(current, old), origin="environment")
    path = default_key_file(config)
    created = None
    if not path.exists() and not create:
        raise EncryptionError(f"no encryption key: {ENV_KEY} is not set and there is no key file at {path}")
    if not path.exists():
        if not _may_create_key_file(config):
            raise _no_shared_key(path)
        created = path if _create_key_file(path) else None
    return KeyringSource(
        read_key_file(path), origin=str(path), key_file=path, created_file=created, warnings=_loose_permissions(path)
    )


def check_keyring(config: StrataConfig, environ: Mapping[str, str]) -> None:
    """Raise the EncryptionError `load_keyring` would, without creating a key file: for checks before start."""
    if environ.get(ENV_KEY, "").strip():
        decode_key(environ[ENV_KEY], ENV_KEY)
        for old in environ.get(ENV_OLD_KEYS, "").split(","):
            if old.strip():
                decode_key(old, ENV_OLD_KEYS)
        return
    path = default_key_file(config)
    if path.exists():
        read_key_file(path)
    elif not _may_create_key_file(config):
        raise _no_shared_key(path)


def _may_create_key_file(config: StrataConfig) -> bool:
    # Only the embedded SQLite database is one replica's own: a shared database needs a shared key.
    return make_url(config.effective_database_url).get_backend_name() == "sqlite"


def _no_shared_key(path: Path) -> EncryptionError:
    return EncryptionError(
        f"no encryption key: every replica sharing this database needs the same key, so Strata will not "
        f"make one up; set {ENV_KEY} (base64 of 32 random bytes, e.g. `openssl rand -base64 32`) or point "
        f"security.encryption.key_file at a shared file (missing: {path})"
    )


def decode_key(value: str, name: str) -> bytes:
    text = value.strip()
    try:
        key = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionError(f"{name} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise EncryptionError(f"{name} decodes to {len(key)} bytes; AES-256 needs exactly {KEY_BYTES}")
    return key


def read_key_file(path: Path) -> Keyring:
    try:
        doc = orjson.loads(path.read_bytes())
        keys = {entry["kid"]: decode_key(entry["key"], f"key {entry['kid']!r} in {path}") for entry in doc["keys"]}
        current = doc["current"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise EncryptionError(f"cannot read encryption key file {path}: {exc!r}") from None
    return Keyring(keys, current, reload=lambda: read_key_file(path))


def rotate_key_file(path: Path) -> str:
    """Add a fresh key and make it current; older keys stay so existing records remain readable."""
    doc = orjson.loads(path.read_bytes())
    key = secrets.token_bytes(KEY_BYTES)
    doc["keys"].append(_entry(key))
    doc["current"] = key_id(key)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    _write_new(tmp, doc)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one, never half of one
    return doc["current"]


def _create_key_file(path: Path) -> bool:
    """Create the file with one fresh key; False if another process created it first."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        _write_new(path, {"current": key_id(key), "keys": [_entry(key)]})
    except FileExistsError:
        return False
    return True


def _write_new(path: Path, doc: dict[str, Any]) -> None:
    # 0600 from the first byte: created with that mode, never chmod-ed after (no window where it is readable).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        file.flush()
        os.fsync(file.fileno())


def _entry(key: bytes) -> dict[str, str]:
    return {"kid": key_id(key), "key": base64.b64encode(key).decode(), "created_at": datetime.now(UTC).isoformat()}


def _loose_permissions(path: Path) -> tuple[str, ...]:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return (f"encryption key file {path} has permissions {mode:04o}; it should be 0600 (chmod 600 {path})",)
    return ()


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
