"""`strata usage`: requests, tokens, cost and latency from the usage table, read straight from the database
(the machine's operator is trusted), like `strata keys` and `strata audit`."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from strata.cli_support import invalid_option, load_or_exit, on_database, option_error
from strata.config import StrataConfig
from strata.cost.budgets import format_usd
from strata.cost.query import UsageQuery, iso
from strata.cost.records import UsageRow
from strata.store.database import Database
from strata.store.usage import GROUP_BYS, UsageStore

usage_app = typer.Typer(
    name="usage",
    add_completion=False,
    help="Requests, tokens, cost and p50/p95 latency, grouped by key, user, agent, model or day.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Path to strata.yaml (default: $STRATA_CONFIG, then ./strata.yaml)."),
]


@usage_app.callback(invoke_without_command=True)
def usage(
    group_by: Annotated[str, typer.Option("--group-by", "-g", help="key, user, agent, model or day.")] = "model",
    since: Annotated[
        str | None, typer.Option("--from", help="ISO date or date-time, UTC (default: this month's start).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--to", help="ISO date (included) or date-time (excluded); default: now.")
    ] = None,
    user: Annotated[str | None, typer.Option(help="Only this user's usage.")] = None,
    kind: Annotated[str | None, typer.Option(help="chat, embeddings, completions (API) or run_step (agents).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigOption = None,
) -> None:
    """Usage and cost over a time window (the same numbers as GET /v1/usage)."""
    try:
        query = UsageQuery.model_validate(
            {"group_by": group_by, "from": since, "to": until, "user": user, "kind": kind}
        )
    except ValidationError as exc:
        invalid_option(option_error(exc))
    loaded = load_or_exit(config)
    rows, total = _read(loaded, query.group_by, query.since, query.until, query.user, query.kind)
    if as_json:
        body = {
            "group_by": query.group_by,
            "from": iso(query.since),
            "to": iso(query.until),
            "data": [row.to_json() for row in rows],
            "total": total.to_json() if total else None,
        }
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    title = f"usage by {query.group_by}, {_short(query.since)} to {_short(query.until)} (UTC)"
    if not rows:
        out.print(f"{title}: no requests", highlight=False)
        return
    out.print(_table(title, query.group_by, rows, total))


def _table(title: str, group_by: str, rows: list[UsageRow], total: UsageRow | None) -> Table:
    table = Table(title=title, show_footer=total is not None)
    footer = total or UsageRow(None, 0, 0, 0, 0, 0, 0.0, None, None)
    columns = [
        (group_by, "total", "left"),
        ("requests", f"{footer.requests:,}", "right"),
        ("errors", f"{footer.errors:,}", "right"),
        ("prompt\ntokens", f"{footer.prompt_tokens:,}", "right"),
        ("completion\ntokens", f"{footer.completion_tokens:,}", "right"),
        ("cost", format_usd(footer.cost_usd), "right"),
        ("p50\nlatency", _seconds(footer.latency_p50_s), "right"),
        ("p95\nlatency", _seconds(footer.latency_p95_s), "right"),
    ]
    for header, foot, justify in columns:
        # Numbers are never cut short: a narrow terminal folds the group names instead.
        grouping = header == group_by
        table.add_column(
            header,
            footer=foot,
            justify=justify,
            no_wrap=not grouping,
            overflow="fold",
            min_width=12 if grouping else None,
        )  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            Text(row.group if row.group is not None else "-"),
            f"{row.requests:,}",
            f"{row.errors:,}",
            f"{row.prompt_tokens:,}",
            f"{row.completion_tokens:,}",
            format_usd(row.cost_usd),
            _seconds(row.latency_p50_s),
            _seconds(row.latency_p95_s),
        )
    return table


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _short(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _read(
    loaded: StrataConfig,
    group_by: str,
    since: datetime,
    until: datetime,
    user: str | None,
    kind: str | None,
) -> tuple[list[UsageRow], UsageRow | None]:
    assert group_by in GROUP_BYS

    async def work(db: Database) -> tuple[list[UsageRow], UsageRow | None]:
        store = UsageStore(db)
        rows = await store.aggregate(group_by, since, until, user=user, kind=kind)  # type: ignore[arg-type]
        total = await store.aggregate(None, since, until, user=user, kind=kind)  # type: ignore[arg-type]
        return rows, (total[0] if total else None)

    return on_database(loaded, work, what="read usage", table="usage")


if __name__ == "__main__":
    usage_app()
