"""A trace as people read it: the span tree, indented, each span with its duration and a bar placed on the
trace's timeline (a waterfall), instead of spans that name their parents by id. Fits 80 columns: names are
cut short before durations are."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from strata.terminal import shown

BAR_WIDTH = 20
_STATUS_STYLE = {"error": "red", "ok": "green"}


def span_rows(spans: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each span with its tree prefix, depth first, children in start order; a span whose parent is not among
    `spans` (a client's span, or one pruned) is a root."""
    ids = {span["span_id"] for span in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in sorted(spans, key=lambda s: s["start_time"]):
        parent = span.get("parent_span_id")
        children.setdefault(parent if parent in ids else None, []).append(span)

    def walk(parent: str | None, lead: str) -> Iterator[tuple[str, dict[str, Any]]]:
        kids = children.get(parent, [])
        for index, span in enumerate(kids):
            last = index == len(kids) - 1
            branch = "" if parent is None else ("└─ " if last else "├─ ")
            yield lead + branch, span
            yield from walk(span["span_id"], lead + ("" if parent is None else ("   " if last else "│  ")))

    yield from walk(None, "")


def duration(ms: float) -> str:
    if ms < 1:
        return f"{ms * 1000:.0f} µs"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s"


def bar(start: float, end: float, first: float, total: float, width: int = BAR_WIDTH) -> str:
    """The span's place on the timeline: blank up to its start, a block for its length (at least one cell)."""
    if total <= 0:
        return "█".ljust(width)
    offset = min(width - 1, int((start - first) / total * width))
    length = max(1, round((end - start) / total * width))
    return (" " * offset + "█" * length)[:width].ljust(width)


def trace_table(spans: list[dict[str, Any]]) -> Table:
    """The spans of one run or trace as an indented tree with durations and a waterfall."""
    times = [(_seconds(s["start_time"]), _seconds(s["end_time"])) for s in spans]
    first = min((t[0] for t in times), default=0.0)
    total = max((t[1] for t in times), default=0.0) - first
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    # The only column that gives way on a narrow terminal (its cells are cut short, never wrapped): the
    # durations and the timeline keep their width.
    table.add_column("span", min_width=16)
    table.add_column("timeline", no_wrap=True, width=BAR_WIDTH)
    table.add_column("took", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, width=2)
    for prefix, span in span_rows(spans):
        start, end = _seconds(span["start_time"]), _seconds(span["end_time"])
        status = span.get("status") or "unset"
        style = _STATUS_STYLE.get(status, "")
        label = Text(prefix, style="dim", no_wrap=True, overflow="ellipsis") + Text(shown(_label(span)), style=style)
        mark = Text("✗", style="red") if status == "error" else Text("")
        table.add_row(label, Text(bar(start, end, first, total), style="cyan"), duration(span["duration_ms"]), mark)
    return table


def _label(span: dict[str, Any]) -> str:
    """The span's name, and what the name leaves out: the model of a chat, the tool of a tool call."""
    attributes = span.get("attributes") or {}
    name = str(span["name"])
    detail = attributes.get("gen_ai.tool.name") or attributes.get("gen_ai.response.model")
    return f"{name} ({detail})" if detail and str(detail) not in name else name


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
