"""`strata runs ...` and `strata sessions list`: find runs, look into one (steps, events, trace), and act on it
(approve, deny, cancel) over the API of a running Strata, with the caller's API key and its permissions."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated, Any

import orjson
import typer
from httpx_sse import connect_sse
from rich.console import Console
from rich.table import Table
from rich.text import Text

from strata.cli_exit import ExitCode
from strata.cli_http import DEFAULT_URL, KeyOption, UrlOption, call, refused, unreachable
from strata.cli_trace import trace_table
from strata.cost.budgets import format_usd
from strata.terminal import Remote, event_line, say, shown

runs_app = typer.Typer(no_args_is_help=True, help="Agent runs: list, inspect, follow, approve, deny, cancel.")
sessions_app = typer.Typer(no_args_is_help=True, help="Sessions: conversations with an agent across runs.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

RunId = Annotated[str, typer.Argument(help="The run's id (run_...), as `strata runs list` shows it.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
LimitOption = Annotated[int, typer.Option("--limit", "-n", min=1, max=100, help="How many, newest first.")]
CursorOption = Annotated[str | None, typer.Option(help="Go on from a list's next_cursor.")]
FromOption = Annotated[str | None, typer.Option("--from", help="Started at or after: ISO date or date-time, UTC.")]
ToOption = Annotated[str | None, typer.Option("--to", help="Started before: ISO date or date-time, UTC.")]
UserOption = Annotated[str | None, typer.Option(help="Only this user's (needs a role that sees everyone's).")]
AgentOption = Annotated[str | None, typer.Option(help="Only this agent's.")]


@runs_app.command("list")
def list_runs(
    agent: AgentOption = None,
    status: Annotated[
        str | None,
        typer.Option(help="queued, running, awaiting_approval, completed, failed, cancelled; a,b for several."),
    ] = None,
    user: UserOption = None,
    session: Annotated[str | None, typer.Option(help="Only this session's runs.")] = None,
    since: FromOption = None,
    until: ToOption = None,
    limit: LimitOption = 20,
    cursor: CursorOption = None,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Runs, newest first (yours; everyone's with an admin, operator or auditor key)."""
    params = {"agent": agent, "status": status, "user": user, "session_id": session, "from": since, "to": until}
    page = call(Remote(url, api_key), "GET", "/v1/runs", params={**params, "limit": limit, "cursor": cursor})
    if as_json:
        _print_json(page)
        return
    table = runs_table(page["data"], out.width)
    _print_page(table, page, "runs")


@runs_app.command("show")
def show(run_id: RunId, as_json: JsonOption = False, url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
    """A run: status, usage and cost, its steps, what waits for approval, and its answer."""
    run = call(Remote(url, api_key), "GET", f"/v1/runs/{run_id}")
    if as_json:
        _print_json(run)
        return
    say(out, (run["id"], "bold"), "  ", (run["status"], _STATUS_STYLE.get(run["status"], "")))
    usage = run["usage"]
    facts = [
        ("agent", f"{run['agent']} v{run['agent_version']}"),
        ("session", run["session_id"]),
        ("created", _when(run["created_at"])),
        ("finished", _when(run["finished_at"])),
        ("reason", run["status_reason"]),
        ("usage", f"{usage['prompt_tokens']:,} prompt + {usage['completion_tokens']:,} completion tokens"),
        ("cost", format_usd(run["cost_usd"])),
    ]
    for label, value in facts:
        if value:
            say(out, (f"{label:>9}: ", "dim"), str(value))
    if run.get("steps"):
        steps = _table("turn>", "kind", "name*", "status", "tokens>")
        for step in run["steps"]:
            tokens = step["usage"]["prompt_tokens"] + step["usage"]["completion_tokens"]
            steps.add_row(str(step["turn"]), step["kind"], _cut(step["name"]), step["status"], f"{tokens:,}")
        out.print(steps)
    for pending in run.get("pending_approval") or []:
        say(out, ("waits for approval: ", "yellow"), f"{pending['name']}({pending['arguments']})  call {pending['id']}")
    if run.get("pending_approval"):
        say(
            out,
            ("approve with: ", "dim"),
            f"strata runs approve {run['id']}",
            ("   deny: ", "dim"),
            f"strata runs deny {run['id']}",
        )
    if run.get("output"):
        say(out, ("answer:", "dim"))
        say(out, run["output"])


@runs_app.command("events")
def events(
    run_id: RunId,
    after: Annotated[int, typer.Option(min=0, help="Only events after this number (resume where you left).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """The run's events, numbered, as they happen; ends when the run does (Ctrl-C to stop sooner)."""
    import httpx

    remote = Remote(url, api_key)
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=None), headers=remote.headers) as client,
            connect_sse(client, "GET", f"{url.rstrip('/')}/v1/runs/{run_id}/events", params={"after": after}) as source,
        ):
            if source.response.status_code != 200:
                source.response.read()
                refused(source.response)
            for sse in source.iter_sse():
                if as_json:
                    sys.stdout.write(sse.data + "\n")
                    sys.stdout.flush()
                    continue
                data = orjson.loads(sse.data)
                line = event_line(sse.event, data)
                if line is not None:
                    say(out, (f"{data.get('seq', ''):>4} ", "dim"), (f"{sse.event:<18} ", "bold"), line)
    except httpx.HTTPError as exc:
        unreachable(remote, exc)
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.OK) from None


@runs_app.command("trace")
def trace(run_id: RunId, as_json: JsonOption = False, url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
    """The run's spans as a tree with durations and a timeline (from the server's local trace store)."""
    body = call(Remote(url, api_key), "GET", f"/v1/runs/{run_id}/trace")
    if as_json:
        _print_json(body)
        return
    if not body["spans"]:
        say(err, f"no spans of {run_id} yet (spans reach the trace store within a second or so of ending)")
        return
    say(out, "trace ", (", ".join(body["trace_ids"]), "bold"))
    out.print(trace_table(body["spans"]))


@runs_app.command("approve")
def approve(
    run_id: RunId,
    call_id: Annotated[
        str | None, typer.Option("--call", help="Only this pending call (default: all of them).")
    ] = None,
    arguments: Annotated[str | None, typer.Option(help="Run the call with these JSON arguments instead.")] = None,
    comment: Annotated[str | None, typer.Option(help="Why; goes to the audit trail.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Let the tool calls a run waits on go ahead."""
    edited = None
    if arguments is not None:
        try:
            edited = orjson.loads(arguments)
        except orjson.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--arguments") from None
        if not isinstance(edited, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--arguments")
    _decide(Remote(url, api_key), run_id, "approve", call_id, comment, edited)


@runs_app.command("deny")
def deny(
    run_id: RunId,
    call_id: Annotated[
        str | None, typer.Option("--call", help="Only this pending call (default: all of them).")
    ] = None,
    comment: Annotated[str | None, typer.Option(help="Why; the model is told.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Refuse the tool calls a run waits on; the model hears they were denied and goes on."""
    _decide(Remote(url, api_key), run_id, "deny", call_id, comment, None)


@runs_app.command("cancel")
def cancel(run_id: RunId, url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
    """Cancel a run (a running one stops at its next step)."""
    run = call(Remote(url, api_key), "POST", f"/v1/runs/{run_id}/cancel")
    if run["status"] in ("completed", "failed"):  # the API answers a cancel of an ended run with the run as it is
        say(err, (f"{run['id']} had already {run['status']}: nothing to cancel", "yellow"))
        raise typer.Exit(ExitCode.CONFLICT)
    say(out, f"{run['id']}: ", (run["status"], _STATUS_STYLE.get(run["status"], "")))


@sessions_app.command("list")
def list_sessions(
    agent: AgentOption = None,
    user: UserOption = None,
    since: FromOption = None,
    until: ToOption = None,
    limit: LimitOption = 20,
    cursor: CursorOption = None,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Sessions, newest first, with how many runs each has had."""
    params = {"agent": agent, "user": user, "from": since, "to": until, "limit": limit, "cursor": cursor}
    page = call(Remote(url, api_key), "GET", "/v1/sessions", params=params)
    if as_json:
        _print_json(page)
        return
    table = sessions_table(page["data"])
    _print_page(table, page, "sessions")


def _decide(
    remote: Remote,
    run_id: str,
    decision: str,
    call_id: str | None,
    comment: str | None,
    arguments: dict[str, Any] | None,
) -> None:
    body = {"decision": decision, "call_id": call_id, "comment": comment, "arguments": arguments}
    run = call(remote, "POST", f"/v1/runs/{run_id}/approval", body={k: v for k, v in body.items() if v is not None})
    done = "approved" if decision == "approve" else "denied"
    say(out, f"{done}; {run['id']} is ", (run["status"], _STATUS_STYLE.get(run["status"], "")))


_STATUS_STYLE = {"completed": "green", "failed": "red", "cancelled": "red", "awaiting_approval": "yellow"}


def runs_table(runs: list[dict[str, Any]], width: int = 80) -> Table:
    """Runs at `width` columns: the cost only where it fits beside ids that are never cut."""
    with_cost = width >= 90
    table = _table("id", "agent*", "status", "created", *(["cost>"] if with_cost else []))
    for run in runs:
        status = Text(run["status"], style=_STATUS_STYLE.get(run["status"], ""))
        cost = [format_usd(run["cost_usd"])] if with_cost else []
        table.add_row(run["id"], _cut(run["agent"]), status, _when(run["created_at"], short=True), *cost)
    return table


def sessions_table(sessions: list[dict[str, Any]]) -> Table:
    table = _table("id", "agent*", "user*", "created", "runs>")
    for session in sessions:
        cells = (_cut(session["agent"]), _cut(session.get("owner") or "-"), _when(session["created_at"], short=True))
        table.add_row(session["id"], *cells, str(session["runs"]))
    return table


def _table(*columns: str) -> Table:
    """A borderless table that fits 80 columns: only the names (marked `*`) give way, cut short with an
    ellipsis; ids are never broken (they are copied into other commands), nor times and numbers (`>`: right)."""
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    for column in columns:
        name = column.rstrip("*>")
        justify = "right" if column.endswith(">") else "left"
        names = column.endswith("*")
        table.add_column(name, justify=justify, no_wrap=not names, max_width=32 if names else None)  # type: ignore[arg-type]
    return table


def _cut(value: object) -> Text:
    return Text(shown(value), no_wrap=True, overflow="ellipsis")


def _print_page(table: Table, page: dict[str, Any], what: str) -> None:
    if not page["data"]:
        say(err, f"no {what}")
        return
    out.print(table)
    if page["has_more"]:
        say(err, ("more: ", "dim"), f"--cursor {page['next_cursor']}")


def _print_json(body: object) -> None:
    sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")


def _when(iso: str | None, *, short: bool = False) -> str:
    """A time in UTC, to the second; `short`: month, day, hours and minutes, for an 80-column table."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S UTC")
