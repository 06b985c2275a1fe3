"""Cluster tests report what they measured (requests, failures, latency percentiles) in pytest's summary."""

from __future__ import annotations

from collections.abc import Callable

import pytest

MEASURED = "cluster_measured"


@pytest.fixture
def report_load(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """Keep a test's measurements: shown in the terminal summary (with or without -s, under xdist too) and in
    JUnit XML as a property."""

    def report(text: str) -> None:
        record_property(MEASURED, text)

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reports = [
        report
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        if getattr(report, "when", None) == "call" and any(name == MEASURED for name, _ in report.user_properties)
    ]
    if not reports:
        return
    terminalreporter.section("cluster measurements")
    for report in reports:
        terminalreporter.write_line(f"{report.nodeid} ({report.outcome})")
        for name, text in report.user_properties:
            if name == MEASURED:
                for line in str(text).splitlines():
                    terminalreporter.write_line(f"  {line}")
