"""Alembic environment: always handed a connection by `strata.store.database.Database.upgrade`."""

from __future__ import annotations

from alembic import context

from strata.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - offline SQL generation is not supported
    raise RuntimeError("run migrations through `strata db upgrade`")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
