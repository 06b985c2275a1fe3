"""`strata audit verify` and `strata audit export`: check the keyed hash chain against the signed checkpoints,
copy the trail out as JSON Lines."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TextIO, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from strata.cli_exit import ExitCode
from strata.cli_support import load_or_exit, on_database
from strata.config import StrataConfig
from strata.security.audit import VerifyResult
from strata.security.audit_checkpoint import checkpoint_file, read_anchors
from strata.security.encryption import EncryptionError, Keyring, load_keyring
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
def verify(
    config: ConfigOption = None,
    checkpoints: Annotated[
        list[Path] | None,
        typer.Option(
            "--checkpoints",
            help="Checkpoint files, or saved server logs with `audit checkpoint` lines, to check the chain against "
            "(repeatable; default: the server's checkpoint file, security.audit.checkpoint_file).",
        ),
    ] = None,
) -> None:
    """Check every row's HMAC and link, and the chain against the signed checkpoints of its head; exit 1 naming
    the first row that was changed, recomputed, deleted or reordered, or the rows truncated from the end."""
    loaded = load_or_exit(config)
    keyring = _keyring(loaded)
    paths = checkpoints or [checkpoint_file(loaded)]

    async def run(store: AuditStore) -> VerifyResult:
        anchors = read_anchors(paths, store.keys)
        with err.status("verifying the audit chain...") as status:
            return await store.verify(lambda n: status.update(f"verifying the audit chain... {n:,} rows"), anchors)

    result = on_database(
        loaded, lambda db: run(AuditStore(db)), what="read the audit trail", table="audit_events", keyring=keyring
    )
    if not result.ok:
        out.print(f"[bold red]audit chain broken ({result.problem}):[/] {escape(result.message)}", highlight=False)
    else:
        out.print(f"[bold green]audit chain intact:[/] {result.rows_checked:,} rows", highlight=False)
        out.print(f"head: row {result.head_id}, hash {result.head_hash}", highlight=False)
    out.print("checked:", highlight=False)
    for line in result.checked:
        out.print(f"  - {escape(line)}", highlight=False)
    if not result.ok:
        raise typer.Exit(ExitCode.FAILED)


def _keyring(config: StrataConfig) -> Keyring | None:
    """The server's keyring, never created here: without one, keyed rows are reported as unverifiable."""
    try:
        return load_keyring(config, os.environ, create=False).keyring
    except EncryptionError as exc:
        err.print(f"[yellow]no encryption keyring, keyed rows cannot be checked:[/] {exc}", highlight=False)
        return None


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
        raise typer.Exit(ExitCode.USAGE) from None
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
