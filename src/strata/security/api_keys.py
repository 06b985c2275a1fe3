"""The API key format: `sk-strata-` + 256 random bits (base62) + a 6-character checksum.

The checksum (CRC32 of the random part, like GitHub's tokens) lets Strata refuse a mistyped or
made-up key without a database lookup, and lets secret scanners recognise a leaked key.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

KEY_PREFIX = "sk-strata-"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_LEN = 43  # ceil(256 / log2(62))
_CHECK_LEN = 6
KEY_LENGTH = len(KEY_PREFIX) + _BODY_LEN + _CHECK_LEN


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN)


def generate_key() -> str:
    body = _base62(secrets.randbits(256), _BODY_LEN)
    return KEY_PREFIX + body + _checksum(body)


def is_strata_key(value: str) -> bool:
    """A well-formed key with a correct checksum (it may still be unknown, expired or revoked)."""
    if len(value) != KEY_LENGTH or not value.startswith(KEY_PREFIX):
        return False
    body = value[len(KEY_PREFIX) : -_CHECK_LEN]
    return value[-_CHECK_LEN:] == _checksum(body)


def hash_key(secret: str) -> str:
    """What the database stores. A fast hash is right here: the secret has 256 bits of entropy."""
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[: len(KEY_PREFIX) + 6]
