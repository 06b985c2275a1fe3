"""`strata run` and `strata chat`: follow a run's SSE events and render them for people: the run's id first,
a spinner naming the step under way (on a terminal), and a prompt to approve or deny a tool call that needs it.

Everything a model, a tool or the server wrote is shown as it is: printed as `rich.text.Text` (never parsed
for markup such as `[/usr/share]`, nor for emoji codes), with terminal control characters made visible, so a
model's or a tool's output can neither crash the CLI nor drive the terminal. Only our own labels are styled.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import connect_sse
from rich.console import Console
from rich.prompt import Prompt
from rich.status import Status
from rich.text import Text

from strata.cli_exit import ExitCode

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
    """Returns the exit code (`cli_exit`): 0 completed, 1 failed or cancelled, 7 waits for an approval that could
    not be asked for (no terminal); refusals and an unreachable server exit with theirs."""
    outcome, _ = _stream(remote, agent, message, session, console)
    return outcome


def event_line(kind: str, data: dict[str, Any]) -> str | None:
    """One line saying what an event of a run means, for people (None: a text delta, shown as it streams)."""
    if kind == "message.delta":
        return None
    if kind == "step.started":
        if data.get("kind") == "tool":
            return f"turn {data.get('turn')}: calling {data.get('tool')}"
        return f"turn {data.get('turn')}: asking {data.get('model')}"
    if kind == "tool.called":
        return f"{data.get('tool')}({data.get('arguments')})"
    if kind == "tool.result":
        return ("error: " if data.get("is_error") else "") + str(data.get("content", ""))[:500]
    if kind == "message.completed":
        return str(data.get("content") or "")[:500]
    if kind == "approval.requested":
        return "waiting for approval: " + ", ".join(f"{c['name']}({c['arguments']})" for c in data.get("calls", []))
    if kind == "run.waiting":
        return f"waiting {data.get('retry_in_s')}s: {data.get('reason')}"
    rest = {k: v for k, v in data.items() if k not in ("type", "run_id", "seq")}
    return json.dumps(rest, ensure_ascii=False, separators=(", ", ": "))[:500] if rest else ""


class _Progress:
    """On a terminal, a spinner saying which step the run is at while nothing else is shown; elsewhere nothing."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status: Status | None = None

    def show(self, text: str) -> None:
        if not self.console.is_terminal:
            return
        if self.status is None:
            self.status = self.console.status(Text(shown(text), style="dim"))
            self.status.start()
        else:
            self.status.update(Text(shown(text), style="dim"))

    def clear(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def _stream(remote: Remote, agent: str, message: str, session: str | None, console: Console) -> tuple[int, str | None]:
    from strata.cli_http import refused, unreachable

    body = {"input": message, "mode": "stream", "session_id": session}
    session_id = session
    run_id: str | None = None
    progress = _Progress(console)
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=None), headers=remote.headers) as client,
            connect_sse(client, "POST", f"{remote.url.rstrip('/')}/v1/agents/{agent}/runs", json=body) as source,
        ):
            if source.response.status_code != 200:
                source.response.read()
                refused(source.response, console)
            for sse in source.iter_sse():
                data = json.loads(sse.data)
                session_id = data.get("session_id", session_id)
                kind = sse.event
                if run_id is None and data.get("run_id"):
                    run_id = data["run_id"]
                    say(console, ("run ", "dim"), (run_id, "bold"), (f"  session {session_id}", "dim"))
                if kind == "step.started":
                    progress.show(event_line(kind, data) or "")
                    continue
                progress.clear()
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
                    if not _ask_approvals(client, remote, data["run_id"], data["calls"], console):
                        return int(ExitCode.PENDING), session_id
                elif kind in FINAL:
                    if kind != "run.completed":
                        say(console, (f"{kind}: {data.get('reason')}", "red"))
                    return int(ExitCode.OK if kind == "run.completed" else ExitCode.FAILED), session_id
    except httpx.HTTPError as exc:
        progress.clear()
        unreachable(remote, exc, console)
    finally:
        progress.clear()
    return int(ExitCode.FAILED), session_id


def _ask_approvals(
    client: httpx.Client, remote: Remote, run_id: str, calls: list[dict[str, Any]], console: Console
) -> bool:
    """Ask the person at the terminal to approve or deny each pending call, and send each answer bound to that
    very call. Without a terminal to ask on, say how to decide later and return False."""
    from strata.cli_http import refused

    for pending in calls:
        say(console, ("approval needed: ", "yellow"), (f"{pending['name']}({pending['arguments']})", "bold"))
    if not (sys.stdin.isatty() and console.is_terminal):
        _decide_later(run_id, console)
        return False
    for pending in calls:
        try:
            answer = Prompt.ask(
                Text.assemble("[a]pprove or [d]eny ", (shown(pending["name"]), "bold"), "?"),
                console=console, choices=["a", "d"], show_choices=False,
            )  # fmt: skip
        except (EOFError, KeyboardInterrupt):  # the person left without deciding: the run goes on waiting
            console.print()
            _decide_later(run_id, console)
            return False
        decision = {"decision": "approve" if answer == "a" else "deny", "call_id": pending["id"]}
        if pending.get("binding"):
            decision["binding"] = pending["binding"]
        response = client.post(f"{remote.url.rstrip('/')}/v1/runs/{run_id}/approval", json=decision)
        if response.status_code != 200:
            refused(response, console)
        say(
            console,
            ("approved" if answer == "a" else "denied", "green" if answer == "a" else "red"),
            f" {pending['name']}",
        )
    return True


def _decide_later(run_id: str, console: Console) -> None:
    say(console, ("run ", "yellow"), (run_id, "bold"), (" waits for approval; decide with:", "yellow"))
    say(console, f"  strata runs approve {run_id}")
    say(console, f"  strata runs deny {run_id}")


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
