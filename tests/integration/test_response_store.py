"""Stored Responses API responses on SQLite and PostgreSQL: sealed at rest, each visible to its owner only."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from strata.security.encryption import Keyring
from strata.store.database import Database
from strata.store.responses import ResponseStore
from tests.support.databases import fresh_postgres, sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ResponseStore]:
    keyring = Keyring({"k1": secrets.token_bytes(32)}, "k1")
    if request.param == "sqlite":
        with sqlite_url(tmp_path) as url:
            database = Database(url, keyring=keyring)
            await database.upgrade()
            yield ResponseStore(database)
            await database.dispose()
    else:
        async with fresh_postgres() as url:
            database = Database(url, keyring=keyring)
            await database.upgrade()
            yield ResponseStore(database)
            await database.dispose()


def body(response_id: str, status: str = "completed", text_: str = "secret answer") -> dict[str, object]:
    return {"id": response_id, "model": "m", "status": status, "output": [{"type": "message", "text": text_}]}


async def test_owner_only_sealed_updated_and_deleted(store: ResponseStore) -> None:
    conversation = [{"role": "user", "content": "secret question"}]
    await store.save(body("resp_a", "queued"), owner="ann", conversation=conversation)
    await store.save(body("resp_n"), owner=None, conversation=[])
    assert await store.get("resp_a", "bob") is None  # another user's id reads as missing
    assert (await store.get("resp_n", None)) is not None and await store.get("resp_n", "ann") is None
    await store.update(body("resp_a", "completed", "the answer"), [*conversation, {"role": "assistant"}])
    row = await store.get("resp_a", "ann")
    assert row is not None and row.status == "completed" and row.body["output"][0]["text"] == "the answer"
    assert len(row.conversation) == 2
    async with store.db.sessions() as session:
        raw = (await session.execute(text("SELECT body, conversation FROM responses WHERE id = 'resp_a'"))).one()
    assert "secret" not in str(raw) and "answer" not in str(raw)
    assert not await store.delete("resp_a", "bob")
    assert await store.delete("resp_a", "ann")
    assert await store.get("resp_a", "ann") is None
    assert await store.delete("resp_n", None)
