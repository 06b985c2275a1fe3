"""matplotlib without a display, for every chart Strata writes (profile, loadtest, bench)."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend, imported on first use: the CLI starts without paying for it,
    and a server or CI machine has no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
