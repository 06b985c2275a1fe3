"""What every command that reads the config or works on the database does the same way."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from strata.config import StrataConfig
from strata.config_loader import ConfigError, load_config, resolve_config_path
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
        raise typer.Exit(2) from None


def on_database(
    config: StrataConfig,
    work: Callable[[Database], Awaitable[T]],
    *,
    what: str,
    table: str,
    upgrade: bool = False,
) -> T:
    """Open the configured database (migrated first with `upgrade`), run `work`, close it. A database
    error exits 2 with one line naming `what` could not be done, and a hint when `table` is missing."""

    async def main() -> T:
        db = Database(config.effective_database_url)
        try:
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
        raise typer.Exit(2) from None
