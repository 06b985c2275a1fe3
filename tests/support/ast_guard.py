"""Make `ast.parse` safe to re-enter from the garbage collector on CPython 3.11, for the test process.

CPython 3.11.7 and older keep the AST constructor's recursion counter in one per-interpreter struct
(python/cpython#106905, fixed by #113035). `ast.parse` resets it at its start and checks it at its end.
When an allocation inside the constructor starts a garbage collection, the finalizers it runs are
Python code; if one of them formats a traceback (asyncio logging "Task exception was never retrieved",
pytest's unraisable-exception hook), 3.11's `traceback` module calls `ast.parse` for its caret lines,
which resets the shared counter, and the outer parse fails with `SystemError: AST constructor
recursion depth mismatch` for a tree it built correctly. Inside pytest the outer parse is pytest's own
(reading source for a failure report, or rewriting asserts at import), so the whole session dies with
INTERNALERROR. Holding collection off for the length of a parse removes the re-entry: the constructor
then runs no Python code. A lock keeps two threads from toggling the collector under each other.
"""

from __future__ import annotations

import ast
import functools
import gc
import sys
import threading
from typing import Any

_GUARDED = "_strata_gc_guarded"


def install() -> None:
    if sys.version_info >= (3, 13) or getattr(ast.parse, _GUARDED, False):
        return
    unguarded = ast.parse
    lock = threading.RLock()

    @functools.wraps(unguarded)
    def parse(*args: Any, **kwargs: Any) -> Any:
        with lock:
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                return unguarded(*args, **kwargs)
            finally:
                if was_enabled:
                    gc.enable()

    setattr(parse, _GUARDED, True)
    ast.parse = parse
