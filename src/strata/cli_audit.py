"""`strata audit verify` and `strata audit export`: check the hash chain, copy the trail out as JSON Lines."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TextIO, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from strata.cli_support import load_or_exit, on_database
from strata.config import StrataConfig
from strata.security.audit import VerifyResult
from strata.store.audit import AuditStore

audit_app = typer.Typer(
    name="audit", no_args_is_help=True, help="The tamper-evident audit trail: verify its hash chain, export it."
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Path to strata.yaml (default: $STRATA_CONFIG, then ./strata.yaml)."),
]


@audit_app.command("verify")
def verify(config: ConfigOption = None) -> None:
    """Check every row's hash and link; exit 1 naming the first row that was changed, deleted or reordered."""

    async def run(store: AuditStore) -> VerifyResult:
        with err.status("verifying the audit chain...") as status:
            return await store.verify(lambda n: status.update(f"verifying the audit chain... {n:,} rows"))

    result = _with_store(load_or_exit(config), run)
    if not result.ok:
        out.print(f"[bold red]audit chain broken:[/] {escape(result.message)}", highlight=False)
        raise typer.Exit(1)
    out.print(f"[bold green]audit chain intact:[/] {result.rows_checked:,} rows", highlight=False)
    out.print(f"head hash: {result.head_hash}", highlight=False)  # keep it elsewhere: it reveals truncation


@audit_app.command("export")
def export(
    out_path: Annotated[str, typer.Option("--out", "-o", help="File to write, or - for standard output.")],
    config: ConfigOption = None,
) -> None:
    """Write every row (all columns, hashes included) as JSON Lines, oldest first."""
    loaded = load_or_exit(config)
    try:
        with contextlib.ExitStack() as stack:
            handle: TextIO = sys.stdout
            if out_path != "-":
                handle = stack.enter_context(Path(out_path).open("w", encoding="utf-8", newline="\n"))
            written = _with_store(loaded, lambda store: _export(store, handle))
    except OSError as exc:
        err.print(f"[red]cannot write {escape(out_path)}:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    where = "standard output" if out_path == "-" else out_path
    err.print(f"exported {written:,} audit rows to {escape(where)}", highlight=False)


async def _export(store: AuditStore, handle: TextIO) -> int:
    """Stream the rows out; the progress bar shows only on a terminal (and never on stdout)."""
    total = await store.count()
    columns = (TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("export", total=total)
        return await store.export(handle, lambda rows: progress.update(task, completed=rows))


def _with_store(loaded: StrataConfig, work: Callable[[AuditStore], Awaitable[T]]) -> T:
    return on_database(loaded, lambda db: work(AuditStore(db)), what="read the audit trail", table="audit_events")


if __name__ == "__main__":
    audit_app()
