"""The first admin key: from `STRATA_ADMIN_KEY`, or generated on first start and shown once."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import structlog

from strata.security.api_keys import KEY_PREFIX, hash_key, is_strata_key
from strata.security.audit import AuditRecord
from strata.security.audit_log import AuditLog
from strata.store.keys import DuplicateKey, KeySpec, KeyStore

log = structlog.get_logger("strata.auth")
ENV = "STRATA_ADMIN_KEY"
MIN_LENGTH = 16


def admin_key_problem(environ: Mapping[str, str]) -> str | None:
    """Why the key in STRATA_ADMIN_KEY cannot be used, or None: checked before `strata serve` starts anything."""
    secret = environ.get(ENV)
    if not secret:
        return None
    if len(secret) < MIN_LENGTH:
        return (
            f"{ENV} must be at least {MIN_LENGTH} characters (it has {len(secret)}; "
            "better: a key from `strata keys generate`)"
        )
    if secret.startswith(KEY_PREFIX) and not is_strata_key(secret):
        # Every request would be refused as a mistyped key: say so now, not at the first request.
        return (
            f"{ENV} starts with {KEY_PREFIX!r} but its checksum does not match: use `strata keys generate`, "
            f"or any other string of at least {MIN_LENGTH} characters"
        )
    return None


async def ensure_admin_key(
    keys: KeyStore, audit: AuditLog, environ: Mapping[str, str], announce: Callable[[str], None]
) -> None:
    """`announce` receives a generated secret: the one time it is shown. It is never logged."""
    secret = environ.get(ENV)
    if secret:
        if problem := admin_key_problem(environ):
            raise ValueError(problem)
        existing = await keys.by_hash(hash_key(secret))
        if existing is None:
            try:
                key, _ = await keys.create(KeySpec(name="admin", role="admin"), created_by=f"env:{ENV}", secret=secret)
            except DuplicateKey:
                return  # another replica starting at the same moment stored it first
            _created(audit, key.id, f"env:{ENV}")
        elif existing.revoked_at is not None:
            log.warning(f"the key in {ENV} has been revoked; it stays revoked", key_id=existing.id)
        return
    if await keys.has_active_admin():
        return
    key, secret = await keys.create(KeySpec(name="admin", role="admin"), created_by="first-start")
    _created(audit, key.id, "first-start")
    log.info("created the first admin key; it is shown once on the terminal", key_id=key.id, prefix=key.prefix)
    announce(secret)


def _created(audit: AuditLog, key_id: str, actor: str) -> None:
    audit.record(
        AuditRecord(
            action="key.created",
            outcome="success",
            actor=actor,
            actor_role=None,
            resource=f"key {key_id}",
            source_ip=None,
            request_id=None,
            details={"name": "admin", "role": "admin"},
        )
    )
