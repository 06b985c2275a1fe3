"""The async engine and its migrations. Migrations run at start (and with `strata db upgrade`).

A SQLite database holds everything Strata keeps, so its file is created 0600 (SQLite gives its -wal and
-shm files the database file's mode) and a looser mode left by an older install is tightened on open.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from strata.security.encryption import Keyring
from strata.security.file_modes import PRIVATE_DIR, PRIVATE_FILE, tighten
from strata.security.redaction import Redactor
from strata.store.encrypted import attach_keyring
from strata.store.redacted import SHAPES, attach_redactor

MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant will do: it serialises concurrent upgrades of replicas starting together on PostgreSQL.
_MIGRATION_LOCK_ID = 0x5354524154


class Database:
    def __init__(
        self, url: str, *, echo: bool = False, keyring: Keyring | None = None, redactor: Redactor | None = None
    ) -> None:
        """`keyring` encrypts conversation data at rest; without one it is written (and read) as plaintext.
        `redactor` masks credentials in the columns that could catch one (default: by shape only)."""
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                private_sqlite_files(Path(database))
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        self.keyring = keyring
        self.redactor = redactor or SHAPES
        attach_keyring(self.engine, keyring)
        attach_redactor(self.engine, self.redactor)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin)
        # Reads go through an engine view marked read-only, so on SQLite they do not take the write lock.
        self.sessions = async_sessionmaker(self.engine.execution_options(strata_read=True), expire_on_commit=False)
        self._writers = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: committed when the block ends, rolled back if it raises."""
        async with self._writers() as session, session.begin():
            yield session

    async def upgrade(self) -> None:
        async with self.engine.begin() as connection:
            if not self.is_sqlite:
                await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            await connection.run_sync(_upgrade)

    async def dispose(self) -> None:
        await self.engine.dispose()


def private_sqlite_files(database: Path) -> None:
    """Create the database file 0600 (in a new folder 0700) before SQLite does; tighten existing ones."""
    if not database.parent.exists():
        database.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    with suppress(FileExistsError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    for suffix in ("", "-wal", "-shm", "-journal"):
        tighten(database.with_name(database.name + suffix), PRIVATE_FILE)


def _upgrade(connection: Connection) -> None:
    # Imported here: alembic (and mako) cost `strata serve` ~0.1 s of start-up, which this defers until
    # after the embedded model server has been launched (see the app's lifespan).
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _sqlite_begin(connection: Connection) -> None:
    # pysqlite defers BEGIN to the first write, so a read-modify-write (approvals, claims) is not
    # isolated and SELECT ... FOR UPDATE does not exist. Write transactions take the write lock at
    # BEGIN, which serialises them; reads begin deferred and, with WAL, never wait for a writer.
    # (SQLAlchemy's pysqlite recipe.)
    read_only = connection.get_execution_options().get("strata_read", False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers work while the engine writes; busy_timeout waits out short write locks.
    dbapi_connection.isolation_level = None  # the driver must not BEGIN on its own; see above
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
