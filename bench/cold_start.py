"""Scenario 6, "cold_start": `strata serve` from exec to ready, embedded model included.

Each repetition starts Strata on the default config in a fresh working directory twice: first with no data
(a first start: the SQLite database is created and migrated, the encryption keyring and the admin key are made),
then again on the data the first start left (a restart). Timed from just before exec until `/readyz` answers 200,
which it does only once the embedded llama.cpp server has loaded the model and answered the supervisor's health
probe; then a first chat completion is sent at once and must succeed. Strata's own log timestamps split the
start into phases.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.embedded_server import MODEL, DefaultStrata
from bench.report import fmt, verdict
from bench.scenarios import Settings
from bench.servers import ADMIN_KEY, BenchServers

NAME = "cold_start"
PHASES = ("first", "restart")
TARGET_S = 5.0
REPS = {True: 2, False: 5}  # quick?: repetitions (each one a first start and a restart)
# Structured-log events that mark the phases of a start, in the order they happen.
EVENTS = ("cpu pool started", "child started", "strata started", "child ready")

METHOD = [
    "**Cold start (6)**: `python -m strata serve --port P` on the default config (no strata.yaml: the embedded"
    " model, SQLite under ./strata-data, STRATA_ADMIN_KEY set) in a fresh directory, timed from just before exec"
    " until `GET /readyz` (polled every 20 ms) answers 200, which needs the embedded llama.cpp server to have"
    " loaded the model and passed the supervisor's health probe. *First start*: an empty data directory"
    " (database created and migrated, keyring and admin key created); *restart*: the same directory again."
    " Right after ready a first chat completion (8 tokens, temperature 0, admin key) must answer 200; its"
    " latency is reported. Phases come from Strata's own structured-log timestamps relative to exec.",
]


def _first_completion(base: str) -> tuple[int, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
    started = time.perf_counter()
    try:
        response = httpx.post(
            base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
        )
        status = response.status_code
    except httpx.HTTPError:
        status = 0
    return status, (time.perf_counter() - started) * 1000.0


def _start_once(workdir: Path, phase: str) -> dict[str, Any]:
    strata = DefaultStrata(workdir, name=phase).start()
    try:
        sample: dict[str, Any] = dict(strata.wait_ready())
        sample["first_status"], sample["first_completion_ms"] = _first_completion(strata.base)
    finally:
        stopping = time.monotonic()
        strata.stop()
        stop_s = time.monotonic() - stopping
    events = strata.events()
    sample["events_s"] = {name: events[name] for name in EVENTS if name in events}
    sample["stop_s"] = stop_s
    return sample


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "max": max(values), "min": min(values)} if values else {}


def run(servers: BenchServers, s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Repeated first starts and restarts of the default config; `servers` is not used (own processes)."""
    del servers
    samples: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES}
    for rep in range(REPS[s.quick]):
        with tempfile.TemporaryDirectory(prefix="strata-bench-cold-") as tmp:
            for phase in PHASES:
                sample = _start_once(Path(tmp), phase)
                samples[phase].append(sample)
                log(
                    f"cold start {rep + 1}/{REPS[s.quick]} {phase}: ready {sample['ready_s']:.2f} s (listening "
                    f"{sample['listening_s']:.2f} s), first completion {sample['first_status']} in "
                    f"{sample['first_completion_ms']:.0f} ms"
                )
    summary = {}
    for phase in PHASES:
        rows = samples[phase]
        summary[phase] = {
            "ready_s": _stats([x["ready_s"] for x in rows]),
            "listening_s": _stats([x["listening_s"] for x in rows]),
            "first_completion_ms": _stats([x["first_completion_ms"] for x in rows]),
            "first_ok": sum(1 for x in rows if x["first_status"] == 200),
            "stop_s": _stats([x["stop_s"] for x in rows]),
            "events_s": {e: _stats([x["events_s"][e] for x in rows if e in x["events_s"]]) for e in EVENTS},
        }
    return {"reps": REPS[s.quick], "target_s": TARGET_S, "summary": summary, "samples": samples}


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    r = (results.get("scenarios") or {}).get(NAME)
    if not r:
        return []
    out: list[tuple[str, str, str, str, str]] = []
    where = "6. Cold start, `strata serve` (default config, embedded model)"
    labels = {"first": "exec to /readyz 200, first start (empty data dir)", "restart": "exec to /readyz 200, restart"}
    for phase in PHASES:
        ready = r["summary"][phase]["ready_s"]
        detail = f"p50 {fmt(ready['p50'])} s, max {fmt(ready['max'])} s ({r['reps']} starts)"
        out.append((where, labels[phase], f"<= {TARGET_S:g} s", detail, verdict(ready["max"] <= TARGET_S)))
    n = r["reps"] * len(PHASES)
    ok = sum(r["summary"][phase]["first_ok"] for phase in PHASES)
    lat = _stats([x["first_completion_ms"] for phase in PHASES for x in r["samples"][phase]])
    detail = f"{ok}/{n} answered 200; latency p50 {fmt(lat['p50'], 0)} ms, max {fmt(lat['max'], 0)} ms"
    out.append((where, "first chat completion right after ready", "succeeds", detail, verdict(ok == n)))
    return out


def section(results: dict[str, Any]) -> list[str]:
    r = (results.get("scenarios") or {}).get(NAME)
    if not r:
        return []
    lines = [
        "",
        f"### Cold start ({r['reps']} repetitions of a first start and a restart; seconds from exec, p50 / max)",
        "",
        "| Start | Answers HTTP | CPU pool up | llama.cpp server launched | Lifespan done | Model ready |"
        " /readyz 200 | First completion (ms) | Stop (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pair = lambda x: f"{fmt(x.get('p50'))} / {fmt(x.get('max'))}" if x else "-"  # noqa: E731
    for phase in PHASES:
        m = r["summary"][phase]
        ev = m["events_s"]
        first = m["first_completion_ms"]
        lines.append(
            f"| {'first start (empty data dir)' if phase == 'first' else 'restart'} | {pair(m['listening_s'])} | "
            + " | ".join(pair(ev.get(e, {})) for e in EVENTS)
            + f" | {pair(m['ready_s'])} | {fmt(first['p50'], 0)} / {fmt(first['max'], 0)} | {pair(m['stop_s'])} |"
        )
    lines += [
        "",
        "Phases are Strata's log events (`cpu pool started`, `child started`: the llama.cpp server process was"
        " spawned, `strata started`: the lifespan finished, `child ready`: the model server passed its health"
        " probe). Strata answers HTTP as soon as it listens, before that start-up work (503 from /readyz, saying"
        " what is still loading), and turns ready once `strata started` and the model server is ready.",
    ]
    return lines
