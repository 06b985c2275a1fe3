"""The test process survives a garbage collection that re-enters `ast.parse` (CPython 3.11's AST bug).

This is what crashed `make test` with INTERNALERROR: a task whose exception nobody read was collected
while pytest parsed source for the next failure report, and its finalizer formatted a traceback.
"""

from __future__ import annotations

import ast
import gc
import subprocess
import sys

from tests.support.strata_process import REPO_ROOT

# Each instance parses from its finalizer, as a traceback formatted by a collected object does on 3.11.
PROGRAM = """
import ast, gc, sys
if sys.argv[1] == "guarded":
    from tests.support import ast_guard
    ast_guard.install()

SOURCE = "\\n".join(f"x{i} = [{i}, ({i}, {{'k': {i}}})]" for i in range(3000))


class ParsesWhenCollected:
    def __del__(self):
        ast.parse("a + b * c")

for _ in range(50):
    cycle = ParsesWhenCollected()
    cycle.me = cycle  # only the collector frees it
del cycle
gc.set_threshold(1)  # a collection at nearly every allocation, inside the parse below
ast.parse(SOURCE)
print("parsed")
"""


def run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


def test_a_collection_inside_ast_parse_that_parses_again_does_not_break_it() -> None:
    guarded = run("guarded")
    assert guarded.returncode == 0 and guarded.stdout.strip() == "parsed", guarded.stderr


def test_the_guard_is_installed_in_the_test_process() -> None:
    assert getattr(ast.parse, "_strata_gc_guarded", False) or sys.version_info >= (3, 13)
    assert gc.isenabled()  # and it leaves the collector as it found it
    ast.parse("1 + 1")
    assert gc.isenabled()
