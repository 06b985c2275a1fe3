"""`strata run` and `strata chat`: follow a run's SSE events and render them for people."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
from httpx_sse import connect_sse
from rich.console import Console
from rich.prompt import Prompt

FINAL = ("run.completed", "run.failed", "run.cancelled")


@dataclass(frozen=True)
class Remote:
    """A Strata server and the API key to call it with."""

    url: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def stream_run(remote: Remote, agent: str, message: str, session: str | None, console: Console) -> int:
    """Returns the exit code: 0 completed, 1 failed or cancelled, 2 could not start."""
    outcome, _ = _stream(remote, agent, message, session, console)
    return outcome


def _stream(remote: Remote, agent: str, message: str, session: str | None, console: Console) -> tuple[int, str | None]:
    body = {"input": message, "mode": "stream", "session_id": session}
    session_id = session
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=None), headers=remote.headers) as client,
            connect_sse(client, "POST", f"{remote.url.rstrip('/')}/v1/agents/{agent}/runs", json=body) as source,
        ):
            if source.response.status_code != 200:
                source.response.read()
                error = source.response.json().get("error", {})
                console.print(f"[red]error {source.response.status_code}:[/] {error.get('message')}", highlight=False)
                return 2, session
            for sse in source.iter_sse():
                data = json.loads(sse.data)
                session_id = data.get("session_id", session_id)
                kind = sse.event
                if kind == "message.delta":
                    console.print(data["content"], end="", highlight=False, markup=False)
                elif kind == "message.completed":
                    console.print()
                elif kind == "tool.called":
                    console.print(f"[cyan]-> {data['tool']}({data['arguments']})[/]", highlight=False)
                elif kind == "tool.result":
                    style = "red" if data["is_error"] else "green"
                    console.print(f"[{style}]<- {data['content'][:500]}[/]", highlight=False, markup=True)
                elif kind == "run.waiting":
                    console.print(f"[yellow]waiting {data['retry_in_s']}s: {data['reason']}[/]", highlight=False)
                elif kind == "approval.requested":
                    console.print("[yellow]waiting for approval:[/] " + ", ".join(c["name"] for c in data["calls"]))
                elif kind in FINAL:
                    if kind != "run.completed":
                        console.print(f"[red]{kind}: {data.get('reason')}[/]", highlight=False)
                    return (0 if kind == "run.completed" else 1), session_id
    except httpx.HTTPError as exc:
        console.print(f"[red]cannot reach Strata at {remote.url}: {exc}[/]", highlight=False)
        return 2, session
    return 1, session_id


def chat_loop(remote: Remote, agent: str, console: Console) -> None:
    session: str | None = None
    console.print(f"chatting with [bold]{agent}[/] at {remote.url} (empty line to leave)")
    while True:
        try:
            message = Prompt.ask("[bold]you[/]", console=console, default="", show_default=False)
        except (EOFError, KeyboardInterrupt):
            return
        if not message.strip():
            return
        _, session = _stream(remote, agent, message, session, console)
