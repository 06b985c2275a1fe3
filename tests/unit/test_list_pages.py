"""Keyset cursors (`store.pages`) and the trace tree of `strata runs trace` (`cli_trace`): pure functions."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from rich.console import Console

from strata.cli_trace import bar, span_rows, trace_table
from strata.store.pages import MAX_AT, BadCursor, Position


def test_a_cursor_comes_back_as_the_position_it_was_made_from() -> None:
    position = Position(1_733_600_000_123_456, "run_" + "f" * 32)
    cursor = position.encode("runs")
    assert "=" not in cursor and Position.decode(cursor, "runs") == position


@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor!",
        base64.urlsafe_b64encode(b"[1,2]").decode(),
        base64.urlsafe_b64encode(b'["runs", true, "x"]').decode(),
        base64.urlsafe_b64encode(b'["runs", -1, "x"]').decode(),
        base64.urlsafe_b64encode(f'["runs", {MAX_AT + 1}, "x"]'.encode()).decode(),
        Position(5, "sess_x").encode("sessions"),  # another list's
    ],
)
def test_a_cursor_not_handed_out_by_this_list_is_refused(cursor: str) -> None:
    with pytest.raises(BadCursor):
        Position.decode(cursor, "runs")


def span(span_id: str, parent: str | None, start_ms: int, end_ms: int, **extra: Any) -> dict[str, Any]:
    return {
        "span_id": span_id,
        "parent_span_id": parent,
        "name": extra.pop("name", span_id),
        "start_time": f"2026-01-01T00:00:{start_ms // 1000:02d}.{start_ms % 1000:03d}+00:00",
        "end_time": f"2026-01-01T00:00:{end_ms // 1000:02d}.{end_ms % 1000:03d}+00:00",
        "duration_ms": float(end_ms - start_ms),
        "status": extra.pop("status", "ok"),
        "attributes": extra,
    }


def test_spans_become_a_tree_in_start_order_whatever_order_they_come_in() -> None:
    spans = [
        span("tool", "agent", 50, 60),
        span("chat2", "agent", 70, 90),
        span("agent", "request", 10, 95),
        span("chat1", "agent", 20, 45),
        span("request", "client-span-not-stored", 0, 100),  # its parent is elsewhere: a root here
    ]
    rows = [(prefix, s["span_id"]) for prefix, s in span_rows(spans)]
    assert rows == [
        ("", "request"),
        ("└─ ", "agent"),
        ("   ├─ ", "chat1"),
        ("   ├─ ", "tool"),
        ("   └─ ", "chat2"),
    ]


def test_the_timeline_puts_each_span_where_it_ran() -> None:
    assert bar(0, 100, 0, 100, width=10) == "█" * 10
    assert bar(50, 60, 0, 100, width=10) == "     █    "
    assert bar(99.9, 100, 0, 100, width=10) == "         █"  # a blink still shows
    assert bar(0, 0, 0, 0, width=4) == "█   "


def test_a_trace_table_fits_80_columns_and_keeps_durations_whole() -> None:
    long_name = "execute_tool " + "a_very_long_tool_name_" * 5
    spans = [
        span("root", None, 0, 1500, name="POST /v1/agents/{agent}/runs"),
        span("t", "root", 10, 20, name=long_name),
    ]
    console = Console(width=80, record=True, color_system=None)
    console.print(trace_table(spans))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert any("1.50 s" in line for line in lines) and any("10.0 ms" in line and "…" in line for line in lines)


def test_run_and_session_tables_fit_80_columns_with_whole_ids() -> None:
    from strata.cli_runs import runs_table, sessions_table

    run_id, session_id = "run_" + "a" * 32, "sess_" + "b" * 32
    runs = [{"id": run_id, "agent": "x" * 64, "status": "awaiting_approval", "created_at": "2026-12-07T21:33:33+00:00"}]
    sessions = [
        {"id": session_id, "agent": "y" * 64, "owner": "z" * 128, "created_at": "2026-12-07T21:33:33", "runs": 3}
    ]
    for table in (runs_table([{**runs[0], "cost_usd": 1.5}], 80), sessions_table(sessions)):
        console = Console(width=80, record=True, color_system=None)
        console.print(table)
        lines = console.export_text().splitlines()
        assert all(len(line) <= 80 for line in lines)
        assert run_id in lines[1] or session_id in lines[1]
        assert "awaiting_approval" in lines[1] or "   3" in lines[1]
        assert "12-07 21:33" in lines[1] and "…" in lines[1]
