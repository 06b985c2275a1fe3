"""What every command that reads the config or works on the database does the same way."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from strata.cli_exit import ExitCode
from strata.config import StrataConfig
from strata.config_loader import ConfigError, load_config, resolve_config_path
from strata.security.encryption import EncryptionError, Keyring, load_keyring
from strata.store.database import Database

T = TypeVar("T")
err = Console(stderr=True, soft_wrap=True)


def load_or_exit(path: Path | None) -> StrataConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        source = resolve_config_path(path, os.environ)
        # Plain writes: these lines are read by people and grep alike, so they must never wrap.
        sys.stderr.write(f"invalid configuration ({source or 'defaults and environment'}):\n")
        sys.stderr.writelines(f"  {issue}\n" for issue in exc.issues)
        raise typer.Exit(ExitCode.USAGE) from None


def on_database(
    config: StrataConfig,
    work: Callable[[Database], Awaitable[T]],
    *,
    what: str,
    table: str,
    upgrade: bool = False,
    keyring: Keyring | None = None,
) -> T:
    """Open the configured database (migrated first with `upgrade`; with `keyring`, as the server opens it), run
    `work`, close it. A database error exits 2 with one line naming `what` could not be done, and a hint when
    `table` is missing. A database that does not exist is never created here (`require_database`)."""
    require_database(config, what)

    async def main() -> T:
        db = Database(config.effective_database_url, keyring=keyring)
        try:
            if not db.is_sqlite and not await _has_schema(db):
                _refuse(
                    f"cannot {what}: {db.url.render_as_string(hide_password=True)} has no Strata tables; is it the "
                    "database `strata serve` uses? (`strata serve` or `strata db upgrade` creates them)"
                )
            if upgrade:
                await db.upgrade()
            return await work(db)
        finally:
            await db.dispose()

    try:
        return asyncio.run(main())
    except SQLAlchemyError as exc:
        hint = " (run `strata db upgrade` first?)" if table in str(exc) else ""
        reason = str(exc.orig if isinstance(exc, DBAPIError) else exc).splitlines()[0]
        err.print(f"[red]cannot {what}{hint}:[/] {escape(reason)}", highlight=False)
        raise typer.Exit(ExitCode.USAGE) from None


def require_database(config: StrataConfig, what: str) -> None:
    """Exit 2 with one line when the configured SQLite file is not there: the command would act on data no
    server reads (run elsewhere, it would make a new `./strata-data` and a key the server rejects)."""
    url = make_url(config.effective_database_url)
    if url.get_backend_name() == "sqlite" and not _sqlite_file_exists(url.database):
        _refuse(
            f"cannot {what}: no Strata database at {Path(url.database or '').resolve()}. Run this where "
            "`strata serve` runs (its data_dir, ./strata-data by default, is relative to that directory), "
            "or give this command the server's config with --config or STRATA_CONFIG (`strata serve` or "
            "`strata db upgrade` creates the database)"
        )


def keyring_or_exit(config: StrataConfig, *, create: bool = True) -> Keyring:
    """The server's encryption keyring (the key file is created on a new SQLite install unless `create` is
    False: call `require_database` first, so it is only ever made beside an existing database); a missing or
    unusable key exits 2 with the reason."""
    try:
        return load_keyring(config, os.environ, create=create).keyring
    except EncryptionError as exc:
        err.print(f"[red]cannot load the encryption keys:[/] {exc}", highlight=False)
        raise typer.Exit(ExitCode.USAGE) from None


def _sqlite_file_exists(database: str | None) -> bool:
    return database == ":memory:" or (bool(database) and Path(database or "").is_file())


async def _has_schema(db: Database) -> bool:
    def check(connection: Connection) -> bool:
        return inspect(connection).has_table("alembic_version")

    async with db.engine.connect() as connection:
        return await connection.run_sync(check)


def _refuse(message: str) -> NoReturn:
    sys.stderr.write(message + "\n")  # plain: one line people and scripts read alike
    raise typer.Exit(ExitCode.USAGE)


def invalid_option(message: str) -> NoReturn:
    """A bad option or argument: one line on stderr, exit USAGE."""
    err.print(f"[red]invalid option:[/] {escape(message)}", highlight=False)
    raise typer.Exit(ExitCode.USAGE)


def option_error(exc: ValidationError) -> str:
    """The first error of a query model built from command-line options, named as the option (--from: ...)."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]).replace("from_", "from")
    message = first["msg"].removeprefix("Value error, ")
    return ("--" + where.replace("_", "-") + ": " if where else "") + message
