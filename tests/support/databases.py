"""Throwaway databases: a SQLite file, or a fresh PostgreSQL database on the local server."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg

from strata.store.database import Database

POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@asynccontextmanager
async def fresh_postgres() -> AsyncIterator[str]:
    """A new, empty database; yields its SQLAlchemy URL and drops it afterwards."""
    name = f"strata_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"PostgreSQL is needed at {POSTGRES_ADMIN_URL} for this test (.ci/run starts it): {exc}"
        ) from exc
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """fresh_postgres for a synchronous test: its own loop for the database's whole life."""
    loop = asyncio.new_event_loop()
    database = fresh_postgres()
    try:
        yield loop.run_until_complete(database.__aenter__())
    finally:
        loop.run_until_complete(database.__aexit__(None, None, None))
        loop.close()


@contextmanager
def sqlite_url(directory: Path) -> Iterator[str]:
    yield f"sqlite+aiosqlite:///{directory / 'strata.db'}"


@asynccontextmanager
async def migrated(kind: str, directory: Path) -> AsyncIterator[Database]:
    """A migrated, empty database: `kind` "sqlite" (a file in `directory`) or "postgresql" (fresh_postgres)."""
    async with AsyncExitStack() as stack:
        url = (
            stack.enter_context(sqlite_url(directory))
            if kind == "sqlite"
            else await stack.enter_async_context(fresh_postgres())
        )
        database = Database(url)
        await database.upgrade()
        try:
            yield database
        finally:
            await database.dispose()
