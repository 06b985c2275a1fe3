"""API keys in the database: create, look up by hash, list, rotate with an overlap window, revoke."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from strata.security.api_keys import display_prefix, generate_key, hash_key
from strata.store.database import Database
from strata.store.tables import ApiKey


def _utc(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What a new key may do. Lists of None mean "every model/agent"."""

    name: str
    role: str
    user: str | None = None  # default: the key's name
    models: list[str] | None = None
    agents: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    user: str
    role: str
    prefix: str
    models: list[str] | None
    agents: list[str] | None
    rpm: int | None
    tpm: int | None
    budget_usd: float | None
    created_by: str | None
    rotated_from: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    @staticmethod
    def of(row: ApiKey) -> KeyRecord:
        return KeyRecord(
            id=row.id,
            name=row.name,
            user=row.user,
            role=row.role,
            prefix=row.prefix,
            models=row.models,
            agents=row.agents,
            rpm=row.rpm,
            tpm=row.tpm,
            budget_usd=row.budget_usd,
            created_by=row.created_by,
            rotated_from=row.rotated_from,
            created_at=_utc(row.created_at) or datetime.now(UTC),
            expires_at=_utc(row.expires_at),
            revoked_at=_utc(row.revoked_at),
        )


class KeyNotFound(LookupError):
    pass


class DuplicateKey(ValueError):
    """A key with this secret exists already (two replicas creating the same STRATA_ADMIN_KEY at once)."""


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self,
        spec: KeySpec,
        *,
        created_by: str | None,
        secret: str | None = None,
        rotated_from: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """Returns the record and the secret: the only time the secret exists outside the caller."""
        secret = secret or generate_key()
        row = ApiKey(
            id=f"key_{uuid.uuid4().hex[:20]}",
            name=spec.name,
            user=spec.user or spec.name,
            role=spec.role,
            hash=hash_key(secret),
            prefix=display_prefix(secret),
            models=spec.models,
            agents=spec.agents,
            rpm=spec.rpm,
            tpm=spec.tpm,
            budget_usd=spec.budget_usd,
            created_by=created_by,
            rotated_from=rotated_from,
            created_at=datetime.now(UTC),
            expires_at=spec.expires_at,
            revoked_at=None,
        )
        try:
            async with self.db.transaction() as tx:
                tx.add(row)
        except IntegrityError:
            raise DuplicateKey(f"a key with the prefix {row.prefix} exists already") from None
        return KeyRecord.of(row), secret

    async def by_hash(self, digest: str) -> KeyRecord | None:
        async with self.db.sessions() as session:
            row = (await session.execute(select(ApiKey).where(ApiKey.hash == digest))).scalar_one_or_none()
        return KeyRecord.of(row) if row else None

    async def get(self, key_id: str) -> KeyRecord:
        async with self.db.sessions() as session:
            row = await session.get(ApiKey, key_id)
        if row is None:
            raise KeyNotFound(f"no API key {key_id!r}")
        return KeyRecord.of(row)

    async def list(self, *, include_revoked: bool = False, user: str | None = None) -> list[KeyRecord]:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        if user is not None:
            query = query.where(ApiKey.user == user)
        async with self.db.sessions() as session:
            return [KeyRecord.of(row) for row in (await session.execute(query)).scalars()]

    async def revoke(self, key_id: str) -> KeyRecord:
        async with self.db.transaction() as tx:
            row = await tx.get(ApiKey, key_id)
            if row is None:
                raise KeyNotFound(f"no API key {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
            return KeyRecord.of(row)

    async def update(self, key_id: str, **changes: object) -> tuple[KeyRecord, KeyRecord]:
        """Change role or limits; returns (before, after) for the audit trail."""
        async with self.db.transaction() as tx:
            row = await tx.get(ApiKey, key_id)
            if row is None:
                raise KeyNotFound(f"no API key {key_id!r}")
            before = KeyRecord.of(row)
            for name, value in changes.items():
                setattr(row, name, value)
            return before, KeyRecord.of(row)

    async def rotate(self, key_id: str, overlap: timedelta, *, created_by: str | None) -> tuple[KeyRecord, str]:
        """A new key with the same grants; the old one keeps working for `overlap`, then expires."""
        old = await self.get(key_id)
        now = datetime.now(UTC)
        if not old.active(now):
            raise KeyNotFound(f"API key {key_id!r} is revoked or expired; create a new one instead")
        spec = KeySpec(
            name=old.name,
            role=old.role,
            user=old.user,
            models=old.models,
            agents=old.agents,
            rpm=old.rpm,
            tpm=old.tpm,
            budget_usd=old.budget_usd,
            expires_at=old.expires_at,
        )
        new, secret = await self.create(spec, created_by=created_by, rotated_from=old.id)
        ends = now + overlap
        async with self.db.transaction() as tx:
            await tx.execute(
                update(ApiKey)
                .where(ApiKey.id == old.id, (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > ends))
                .values(expires_at=ends)
            )
        return new, secret

    async def has_active_admin(self) -> bool:
        now = datetime.now(UTC)
        return any(key.active(now) for key in await self.list() if key.role == "admin")
