"""The peer frameworks Strata is measured against, in their own virtual environment.

LiteLLM's proxy and LangGraph pin their own versions of FastAPI, uvicorn, pydantic and friends; installing them
next to Strata would let their pins move Strata's (or the reverse). They live in `.venv-peers` instead, created
on first use from PyPI with the exact versions below, and the harness runs them as separate processes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.servers import REPO_ROOT

PEER_VENV = REPO_ROOT / ".venv-peers"
PEER_PACKAGES = (
    "litellm[proxy]==1.108.7",
    "langgraph==1.2.24",
    "langgraph-checkpoint-sqlite==3.1.2",
    "aiosqlite==0.22.1",
    # LiteLLM's `otel` and `prometheus` callbacks import these, and its `[proxy]` extra does not bring them.
    "opentelemetry-sdk==1.45.2",
    "opentelemetry-exporter-otlp-proto-http==1.45.2",
    "prometheus-client==0.26.0",
)
_STAMP = PEER_VENV / ".bench-peers"


def peer_python(log: Callable[[str], None] = print) -> Path:
    """The peers' interpreter, installing them first when missing or when the pinned list changed."""
    python = PEER_VENV / "bin" / "python"
    wanted = "\n".join(PEER_PACKAGES)
    if python.exists() and _STAMP.exists() and _STAMP.read_text() == wanted:
        return python
    log(f"installing benchmark peers into {PEER_VENV} (once): {', '.join(PEER_PACKAGES)}")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PEER_PACKAGES], check=True
    )
    _STAMP.write_text(wanted)
    return python


def peer_version(package: str) -> str:
    """The installed version of a peer package (as the peers' interpreter sees it)."""
    python = PEER_VENV / "bin" / "python"
    done = subprocess.run(
        [str(python), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "-"
