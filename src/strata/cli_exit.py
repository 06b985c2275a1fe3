"""The exit codes of every `strata` command: one per kind of failure, so scripts can tell them apart.

README.md's "Command line" section lists them; a command never invents its own.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the work ran and failed: a run failed or was cancelled, a check found a problem, a plan does not fit
    USAGE = 2  # bad options, arguments or configuration; the server refused the request as invalid (400, 413)
    UNREACHABLE = 3  # no Strata server answers at --url
    AUTH = 4  # 401 or 403: no API key, a wrong one, or one not allowed to do this
    NOT_FOUND = 5  # 404: no such run, session, trace or key (or not one this key may see)
    CONFLICT = 6  # 409: not in a state for that (the run has ended, nothing waits for approval)
    PENDING = 7  # the run waits for an approval that could not be asked for here (no terminal)
    SERVER = 8  # the server failed or is busy (429, 5xx): try again later


def for_status(status: int) -> ExitCode:
    """The exit code of an HTTP error status."""
    if status in (401, 403):
        return ExitCode.AUTH
    if status == 404:
        return ExitCode.NOT_FOUND
    if status == 409:
        return ExitCode.CONFLICT
    if status == 429 or status >= 500:
        return ExitCode.SERVER
    return ExitCode.USAGE
