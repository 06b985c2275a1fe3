"""How commands that talk to a running Strata call its API and report a refusal: one line naming the status
and the server's message, a hint where there is an obvious next step (a 401 says to set STRATA_API_KEY), and
the exit code of `cli_exit` for that kind of failure."""

from __future__ import annotations

from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console

from strata.cli_exit import ExitCode, for_status
from strata.terminal import Remote, say

err = Console(stderr=True, soft_wrap=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="STRATA_URL", help="The Strata server.")]
KeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="STRATA_API_KEY", help="API key (default: $STRATA_API_KEY).")
]
DEFAULT_URL = "http://127.0.0.1:8000"
_HINTS = {
    401: "set STRATA_API_KEY (or pass --api-key) to a key from `strata keys create`, or the server's STRATA_ADMIN_KEY",
    403: "this key's role or grants do not allow it; ask an admin for a key that does",
}


def error_message(response: httpx.Response) -> str:
    """The server's error message (its OpenAI-shaped body), or the body as it came."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message")) if isinstance(error, dict) else response.text.strip()


def refused(response: httpx.Response, console: Console = err) -> NoReturn:
    """Report an error response and exit with its code."""
    status = response.status_code
    say(console, (f"error {status}:", "red"), f" {error_message(response)}")
    if hint := _HINTS.get(status):
        say(console, ("hint:", "yellow"), f" {hint}")
    raise typer.Exit(for_status(status))


def unreachable(remote: Remote, exc: Exception, console: Console = err) -> NoReturn:
    say(console, (f"cannot reach Strata at {remote.url}:", "red"), f" {exc}")
    say(console, ("hint:", "yellow"), " is `strata serve` running there? Set --url or STRATA_URL to where it is")
    raise typer.Exit(ExitCode.UNREACHABLE)


def call(remote: Remote, method: str, path: str, *, params: dict[str, Any] | None = None, body: object = None) -> Any:
    """One API call; its JSON answer, or (after saying why) the exit of its failure."""
    query = {k: v for k, v in (params or {}).items() if v is not None}
    try:
        response = httpx.request(
            method, remote.url.rstrip("/") + path, params=query, json=body, headers=remote.headers, timeout=None
        )
    except httpx.HTTPError as exc:
        unreachable(remote, exc)
    if response.status_code >= 400:
        refused(response)
    return response.json()
