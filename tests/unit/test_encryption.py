"""The keyring: envelopes, tamper detection, where keys come from, key files and their rotation."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

import orjson
import pytest

from strata.config import StrataConfig
from strata.security.encryption import (
    EncryptionError,
    Keyring,
    UnknownKeyError,
    envelope_kid,
    is_envelope,
    key_id,
    load_keyring,
    read_key_file,
    rotate_key_file,
)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def config(tmp_path: Path, **extra: object) -> StrataConfig:
    return StrataConfig.model_validate({"data_dir": str(tmp_path / "data"), **extra})


def test_envelope_round_trip_names_its_key_and_never_repeats() -> None:
    keyring = Keyring.from_keys(secrets.token_bytes(32))
    first, second = keyring.encrypt(b"hello", b"messages.data"), keyring.encrypt(b"hello", b"messages.data")
    assert first != second  # a fresh nonce per record
    assert is_envelope(first) and first.startswith(f"enc:v1:{keyring.current}:")
    assert envelope_kid(first) == keyring.current
    assert b"hello" not in first.encode()
    assert keyring.decrypt(first, b"messages.data") == b"hello"
    assert not is_envelope("hello") and not is_envelope({"$enc": first}) and not is_envelope("enc:v1:abc:short")


def test_tampering_or_another_column_fails_authentication() -> None:
    keyring = Keyring.from_keys(secrets.token_bytes(32))
    envelope = keyring.encrypt(b"secret", b"steps.input")
    body = envelope.rsplit(":", 1)[1]
    flipped = envelope[: -len(body)] + ("A" if body[0] != "A" else "B") + body[1:]
    with pytest.raises(EncryptionError, match="failed authentication"):
        keyring.decrypt(flipped, b"steps.input")
    with pytest.raises(EncryptionError, match="failed authentication"):
        keyring.decrypt(envelope, b"runs.input")  # moved to another column
    with pytest.raises(EncryptionError, match="not an encryption envelope"):
        keyring.decrypt("plain text")


def test_a_record_sealed_by_an_unknown_key_names_that_key() -> None:
    other = Keyring.from_keys(secrets.token_bytes(32))
    envelope = other.encrypt(b"x")
    with pytest.raises(UnknownKeyError, match=other.current):
        Keyring.from_keys(secrets.token_bytes(32)).decrypt(envelope)


def test_environment_key_must_be_32_bytes_of_base64(tmp_path: Path) -> None:
    with pytest.raises(EncryptionError, match="decodes to 16 bytes; AES-256 needs exactly 32"):
        load_keyring(config(tmp_path), {"STRATA_ENCRYPTION_KEY": b64(secrets.token_bytes(16))})
    with pytest.raises(EncryptionError, match="not valid base64"):
        load_keyring(config(tmp_path), {"STRATA_ENCRYPTION_KEY": "not base64 at all!"})
    with pytest.raises(EncryptionError, match="STRATA_ENCRYPTION_OLD_KEYS decodes to 31 bytes"):
        load_keyring(
            config(tmp_path),
            {"STRATA_ENCRYPTION_KEY": b64(secrets.token_bytes(32)), "STRATA_ENCRYPTION_OLD_KEYS": b64(b"x" * 31)},
        )


def test_environment_keys_win_and_old_keys_still_decrypt(tmp_path: Path) -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    sealed = Keyring.from_keys(old).encrypt(b"from before")
    env = {"STRATA_ENCRYPTION_KEY": b64(new), "STRATA_ENCRYPTION_OLD_KEYS": f" {b64(old)} ,"}
    source = load_keyring(config(tmp_path, database_url="postgresql+asyncpg://db/strata"), env)
    assert source.origin == "environment" and source.key_file is None and source.created_file is None
    assert source.keyring.current == key_id(new)
    assert source.keyring.decrypt(sealed) == b"from before"
    urlsafe = base64.urlsafe_b64encode(new).decode().rstrip("=")  # either alphabet, padding optional
    assert load_keyring(config(tmp_path), {"STRATA_ENCRYPTION_KEY": urlsafe}).keyring.current == key_id(new)
    assert not (tmp_path / "data" / "encryption.keys").exists()


def test_embedded_default_creates_a_0600_key_file_once_and_reuses_it(tmp_path: Path) -> None:
    first = load_keyring(config(tmp_path), {})
    path = tmp_path / "data" / "encryption.keys"
    assert first.created_file == path and first.key_file == path and first.warnings == ()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = orjson.loads(path.read_bytes())
    assert doc["current"] == first.keyring.current and [k["kid"] for k in doc["keys"]] == [first.keyring.current]
    sealed = first.keyring.encrypt(b"kept")
    again = load_keyring(config(tmp_path), {})
    assert again.created_file is None and again.keyring.current == first.keyring.current
    assert again.keyring.decrypt(sealed) == b"kept"


def test_configured_key_file_path_is_used(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "strata.keys"
    source = load_keyring(config(tmp_path, security={"encryption": {"key_file": str(path)}}), {})
    assert source.created_file == path and path.exists()


def test_a_key_file_readable_by_others_gives_a_warning_not_a_failure(tmp_path: Path) -> None:
    load_keyring(config(tmp_path), {})
    path = tmp_path / "data" / "encryption.keys"
    os.chmod(path, 0o644)
    source = load_keyring(config(tmp_path), {})
    [warning] = source.warnings
    assert "0644" in warning and "chmod 600" in warning


def test_postgresql_without_a_key_refuses_to_invent_one(tmp_path: Path) -> None:
    with pytest.raises(EncryptionError, match=r"every replica .* same key.*STRATA_ENCRYPTION_KEY"):
        load_keyring(config(tmp_path, database_url="postgresql+asyncpg://db/strata"), {})
    assert not (tmp_path / "data" / "encryption.keys").exists()


def test_postgresql_with_a_shared_key_file_uses_it(tmp_path: Path) -> None:
    made = load_keyring(config(tmp_path), {})  # someone provisioned the shared file
    shared = config(tmp_path, database_url="postgresql+asyncpg://db/strata")
    assert load_keyring(shared, {}).keyring.current == made.keyring.current


def test_rotation_adds_a_current_key_and_keeps_old_records_readable(tmp_path: Path) -> None:
    before = load_keyring(config(tmp_path), {})
    path = before.key_file
    assert path is not None
    old_record = before.keyring.encrypt(b"old")
    new_kid = rotate_key_file(path)
    assert new_kid != before.keyring.current
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["encryption.keys"]  # no temporary file left behind
    after = read_key_file(path)
    assert after.current == new_kid and after.kids == {before.keyring.current, new_kid}
    assert after.decrypt(old_record) == b"old"
    assert envelope_kid(after.encrypt(b"new")) == new_kid


def test_a_file_ring_reloads_once_for_a_key_it_has_not_seen(tmp_path: Path) -> None:
    running = load_keyring(config(tmp_path), {}).keyring  # a server started before the rotation
    path = tmp_path / "data" / "encryption.keys"
    rotate_key_file(path)
    sealed_after = read_key_file(path).encrypt(b"re-encrypted")
    assert running.decrypt(sealed_after) == b"re-encrypted"
    assert running.current != envelope_kid(sealed_after)  # it keeps sealing with its own key until restarted
    stranger = Keyring.from_keys(secrets.token_bytes(32)).encrypt(b"x")
    with pytest.raises(UnknownKeyError):
        running.decrypt(stranger)


def test_keyring_rejects_bad_keys() -> None:
    with pytest.raises(EncryptionError, match="exactly 32"):
        Keyring({"k": b"short"}, "k")
    with pytest.raises(EncryptionError, match="not in the keyring"):
        Keyring({"k": secrets.token_bytes(32)}, "other")


def test_subkeys_are_derived_per_purpose_and_key(tmp_path: Path) -> None:
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    ring = Keyring.from_keys(key, [other])
    chain, idempotency = ring.subkey("audit"), ring.subkey("idempotency")
    assert len(chain) == 32 and chain != idempotency and key not in (chain, idempotency)
    assert Keyring.from_keys(key).subkey("audit") == chain  # the same key gives every replica the same subkey
    assert ring.subkey("audit", key_id(other)) not in (chain, other)  # a retired key still derives its own
    with pytest.raises(UnknownKeyError):
        ring.subkey("audit", "00000000")
    running = load_keyring(config(tmp_path), {}).keyring  # started before another process rotated the file
    rotated = rotate_key_file(tmp_path / "data" / "encryption.keys")
    assert running.subkey("audit", rotated) == read_key_file(tmp_path / "data" / "encryption.keys").subkey("audit")


def test_a_reading_tool_does_not_make_up_a_key_file(tmp_path: Path) -> None:
    with pytest.raises(EncryptionError, match="no key file"):
        load_keyring(config(tmp_path), {}, create=False)
    assert not (tmp_path / "data" / "encryption.keys").exists()
