"""The API key format and secret redaction."""

from __future__ import annotations

import re

from strata.security.api_keys import KEY_LENGTH, display_prefix, generate_key, hash_key, is_strata_key
from strata.security.rbac import ROLE_PERMISSIONS, Permission
from strata.security.redaction import MASK, Redactor


def test_generated_keys_are_unique_well_formed_and_self_checking() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert len(key) == KEY_LENGTH and re.fullmatch(r"sk-strata-[0-9A-Za-z]{49}", key)
        assert is_strata_key(key)
    key = keys.pop()
    for i in range(len("sk-strata-"), len(key)):  # any single-character typo is caught by the checksum
        typo = key[:i] + ("a" if key[i] != "a" else "b") + key[i + 1 :]
        assert not is_strata_key(typo), f"typo at {i} passed"
    assert not is_strata_key(key[:-1])
    assert hash_key(key) != hash_key(typo) and len(hash_key(key)) == 64
    assert key.startswith(display_prefix(key)) and len(display_prefix(key)) < 20


def test_redactor_masks_keys_tokens_known_secrets_and_configured_patterns() -> None:
    key = generate_key()
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
    redactor = Redactor(patterns=[r"(?i)acct-\d{6}"], secrets=["my-admin-secret-value", "short"])
    text = (
        f"key={key} auth='Bearer abcdefghijkl' token {jwt} admin my-admin-secret-value ACCT-123456 short prefix "
        + display_prefix(key)
    )
    masked = redactor.text(text)
    for secret in (key, "abcdefghijkl", jwt, "my-admin-secret-value", "ACCT-123456"):
        assert secret not in masked
    assert masked.count(MASK) == 5
    assert "short" in masked  # too short to be a secret: masking it would mangle ordinary words
    assert display_prefix(key) in masked  # a list's display prefix stays readable
    event = redactor.processor(None, "info", {"event": "x", "nested": {"headers": [f"Bearer {key}"]}})
    assert key not in str(event)


def test_from_environ_masks_strata_and_upstream_secrets() -> None:
    env = {"STRATA_ADMIN_KEY": "admin-key-1234567890", "OPENAI_KEY": "sk-upstream-abcdef", "OTHER": "visible-value"}
    redactor = Redactor.from_environ([], env, ["OPENAI_KEY"])
    masked = redactor.text("admin-key-1234567890 sk-upstream-abcdef visible-value")
    assert masked == f"{MASK} {MASK} visible-value"


def test_roles_nest_the_way_the_readme_says() -> None:
    user = ROLE_PERMISSIONS["user"]
    assert user < ROLE_PERMISSIONS["developer"] and user < ROLE_PERMISSIONS["operator"]
    assert ROLE_PERMISSIONS["admin"] == frozenset(Permission)
    assert Permission.MODELS_INVOKE not in ROLE_PERMISSIONS["auditor"]
    assert Permission.KEYS_MANAGE not in ROLE_PERMISSIONS["operator"] | ROLE_PERMISSIONS["developer"]
