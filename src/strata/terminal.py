"""`strata run` and `strata chat`: follow a run's SSE events and render them for people.

Everything a model, a tool or the server wrote is shown as it is: printed as `rich.text.Text` (never parsed
for markup such as `[/usr/share]`, nor for emoji codes), with terminal control characters made visible, so a
model's or a tool's output can neither crash the CLI nor drive the terminal. Only our own labels are styled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
from httpx_sse import connect_sse
from rich.console import Console
from rich.prompt import Prompt
from rich.text import Text

FINAL = ("run.completed", "run.failed", "run.cancelled")
# C0 controls but newline and tab, DEL and C1 controls (ESC starts the sequences that retitle, recolour or
# rewrite a terminal): shown as \x1b rather than sent to it.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)}


def shown(text: object) -> str:
    """Untrusted text, with control characters made visible."""
    return str(text).translate(_CONTROLS)


def say(console: Console, *parts: str | tuple[str, str], end: str = "\n") -> None:
    """Print pieces of text, each plain or (text, style), as they are: nothing in them is markup."""
    line = Text.assemble(*((shown(p[0]), p[1]) if isinstance(p, tuple) else shown(p) for p in parts))
    console.print(line, end=end, highlight=False, soft_wrap=True)


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
                say(console, (f"error {source.response.status_code}:", "red"), f" {error.get('message')}")
                return 2, session
            for sse in source.iter_sse():
                data = json.loads(sse.data)
                session_id = data.get("session_id", session_id)
                kind = sse.event
                if kind == "message.delta":
                    say(console, data["content"], end="")
                elif kind == "message.completed":
                    console.print()
                elif kind == "tool.called":
                    say(console, (f"-> {data['tool']}({data['arguments']})", "cyan"))
                elif kind == "tool.result":
                    say(console, (f"<- {data['content'][:500]}", "red" if data["is_error"] else "green"))
                elif kind == "run.waiting":
                    say(console, (f"waiting {data['retry_in_s']}s: {data['reason']}", "yellow"))
                elif kind == "approval.requested":
                    say(console, ("waiting for approval:", "yellow"), " " + ", ".join(c["name"] for c in data["calls"]))
                elif kind in FINAL:
                    if kind != "run.completed":
                        say(console, (f"{kind}: {data.get('reason')}", "red"))
                    return (0 if kind == "run.completed" else 1), session_id
    except httpx.HTTPError as exc:
        say(console, (f"cannot reach Strata at {remote.url}: {exc}", "red"))
        return 2, session
    return 1, session_id


def chat_loop(remote: Remote, agent: str, console: Console) -> None:
    session: str | None = None
    say(console, "chatting with ", (agent, "bold"), f" at {remote.url} (empty line to leave)")
    while True:
        try:
            message = Prompt.ask("[bold]you[/]", console=console, default="", show_default=False)
        except (EOFError, KeyboardInterrupt):
            return
        if not message.strip():
            return
        _, session = _stream(remote, agent, message, session, console)
