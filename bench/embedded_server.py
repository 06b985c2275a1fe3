"""A `strata serve` on the default config (the embedded SmolLM2 model) in a fresh working directory.

The embedded and cold-start scenarios need Strata exactly as a user gets it from `strata serve` with no
strata.yaml: the embedded llama.cpp server launched and supervised by Strata, SQLite under ./strata-data,
authentication on (the admin key comes from STRATA_ADMIN_KEY). Nothing of the caller's STRATA_* environment
leaks in, so the defaults are the defaults.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.servers import ADMIN_KEY, Process, create_user_key, free_port

MODEL = "smollm2-135m"  # EmbeddedModelConfig's default name


@dataclass(frozen=True)
class LlamaEndpoint:
    """The llama.cpp server Strata launched: its address, launch token and settings (from Strata's run file)."""

    base_url: str
    token: str
    config_file: Path
    models: list[dict[str, Any]]


class DefaultStrata:
    """One `strata serve` process on the defaults, with `workdir` as its working directory (and data dir)."""

    def __init__(self, workdir: Path, name: str = "strata") -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self.name = name
        self.proc: Process | None = None
        self.exec_wall = 0.0  # time.time() at exec, to place the server's own log timestamps
        self.exec_mono = 0.0

    def start(self) -> DefaultStrata:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        env["STRATA_ADMIN_KEY"] = ADMIN_KEY
        argv = [sys.executable, "-m", "strata", "serve", "--port", str(self.port)]
        self.exec_wall, self.exec_mono = time.time(), time.monotonic()
        self.proc = Process(self.name, argv, self.log_path, env=env, cwd=self.workdir)
        return self

    def wait_ready(self, timeout_s: float = 120.0, poll_s: float = 0.02) -> dict[str, float]:
        """Poll until /readyz answers 200. Seconds from exec to the first HTTP answer and to ready."""
        assert self.proc is not None
        listening: float | None = None
        deadline = self.exec_mono + timeout_s
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if not self.proc.alive():
                    raise RuntimeError(f"strata exited with {self.proc.popen.returncode}:\n{self.proc.logs()}")
                try:
                    status = client.get(self.base + "/readyz").status_code
                except httpx.HTTPError:
                    status = 0
                now = time.monotonic() - self.exec_mono
                if status and listening is None:
                    listening = now
                if status == 200:
                    return {"listening_s": listening if listening is not None else now, "ready_s": now}
                time.sleep(poll_s)
        raise TimeoutError(f"strata was not ready within {timeout_s}s:\n{self.proc.logs()}")

    def create_user_key(self) -> str:
        return create_user_key(self.base)

    def llama_endpoint(self) -> LlamaEndpoint:
        """Read the 0600 launch file Strata wrote for its llama.cpp server (we own the data dir)."""
        files = sorted((self.workdir / "strata-data" / "run").glob("*.llama.json"))
        if not files:
            raise RuntimeError("no llama.cpp launch file under strata-data/run")
        settings = orjson.loads(files[0].read_bytes())
        return LlamaEndpoint(
            base_url=f"http://{settings['host']}:{settings['port']}/v1",
            token=str(settings["api_key"]),
            config_file=files[0],
            models=list(settings["models"]),
        )

    def events(self) -> dict[str, float]:
        """Seconds from exec to the first occurrence of each structured-log event (JSON lines)."""
        found: dict[str, float] = {}
        if not self.log_path.exists():
            return found
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = orjson.loads(line)
                at = dt.datetime.fromisoformat(record["timestamp"]).timestamp()
            except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
                continue
            found.setdefault(str(record.get("event")), at - self.exec_wall)
        return found

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> DefaultStrata:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
