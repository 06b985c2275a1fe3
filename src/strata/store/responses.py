"""Stored Responses API responses, each visible to its owner only: another user's id reads as missing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update

from strata.store.database import Database
from strata.store.runs import utcnow
from strata.store.tables import StoredResponse


class ResponseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def save(
        self,
        body: dict[str, Any],
        *,
        owner: str | None,
        conversation: list[Any],
        run_id: str | None = None,
        session_id: str | None = None,
    ) -> None:
        now = utcnow()
        row = StoredResponse(
            id=body["id"],
            owner=owner,
            model=body["model"],
            status=body["status"],
            body=body,
            conversation=conversation,
            run_id=run_id,
            session_id=session_id,
            created_at=now,
            updated_at=now,
        )
        async with self.db.transaction() as tx:
            tx.add(row)

    async def update(self, body: dict[str, Any], conversation: list[Any] | None = None) -> None:
        """The response's new state (a background response finished, an agent's run moved on)."""
        values: dict[str, Any] = {"status": body["status"], "body": body, "updated_at": utcnow()}
        if conversation is not None:
            values["conversation"] = conversation
        async with self.db.transaction() as tx:
            await tx.execute(update(StoredResponse).where(StoredResponse.id == body["id"]).values(**values))

    async def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        async with self.db.sessions() as session:
            row = await session.scalar(select(StoredResponse).where(StoredResponse.id == response_id))
        return row if row is not None and row.owner == owner else None

    async def delete(self, response_id: str, owner: str | None) -> bool:
        async with self.db.transaction() as tx:
            result = await tx.execute(
                delete(StoredResponse).where(StoredResponse.id == response_id, StoredResponse.owner == owner)
            )
        return bool(result.rowcount)
