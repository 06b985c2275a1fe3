"""Scenario 4, agent-step cost: a 5-step tool loop (5 model calls, 4 calculator calls) durable on SQLite, through
Strata's HTTP API and in LangGraph, against the same scripted mock model, in the same run.

Overhead per model step, for both, is (run latency - 5 x mock call floor - 4 x tool floor) / 5: what the
framework adds around the work it cannot avoid. The floors are measured here, directly: the mock's per-call
time from a keep-alive `httpx.AsyncClient` sending the same five conversations, and the calculator tool's
own invocation time.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from bench.loadgen import percentiles
from bench.mock_upstream import AGENT_TOOL_TURNS, agent_message
from bench.peers import peer_python
from bench.report import fmt, verdict
from bench.scenarios import Settings
from bench.servers import CODE_AGENT, MODEL, REPO_ROOT, BenchServers, cpu_seconds

NAME = "agent_steps"
AGENT = "bench-agent"  # configured in BenchServers.config()
PROMPT = "Work it out with the calculator, step by step."
MODEL_STEPS = AGENT_TOOL_TURNS + 1
TOOL_STEPS = AGENT_TOOL_TURNS
TARGET_OVERHEAD_MS = 1.0
TARGET_RATIO = 5.0
PCTS = ("p50", "p90", "p99")


def _sizes(s: Settings) -> dict[str, Any]:
    if s.quick:
        return {"runs": 16, "warmup": 3, "concurrency": [1, 8], "floor_rounds": 30}
    return {"runs": 300, "warmup": 20, "concurrency": [1, 8], "floor_rounds": 200}


def tool_schema() -> dict[str, Any]:
    """The calculator's schema exactly as Strata offers it to the model (LangGraph's graph gets the same)."""
    from strata.agents.tools.builtins import calculator
    from strata.agents.tools.functions import FunctionTool

    return FunctionTool(calculator).spec.openai_schema()


def conversations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The five model requests of one run, as the mock's script makes them grow."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": PROMPT}]
    bodies = []
    for _ in range(MODEL_STEPS):
        body = {"model": MODEL, "messages": list(messages), "tools": [schema], "tool_choice": "auto"}
        bodies.append(body)
        message, _finish = agent_message(body)
        messages.append(message)
        for call in message.get("tool_calls") or ():
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "0"})
    return bodies


async def _model_floor(url: str, bodies: list[dict[str, Any]], rounds: int, stream: bool) -> dict[str, float]:
    """Per-call time of the mock alone, one call at a time over one keep-alive connection."""
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    samples = []
    async with httpx.AsyncClient(timeout=10.0) as client:
        for round_ in range(rounds + 5):
            for body in bodies:
                started = time.perf_counter()
                response = await client.post(url, json={**body, **extra})
                response.raise_for_status()
                response.read()
                if round_ >= 5:  # the first rounds warm the connection and the caches up
                    samples.append((time.perf_counter() - started) * 1000.0)
    return percentiles(samples)


async def _tool_floor(rounds: int) -> dict[str, float]:
    """The calculator's own time as Strata invokes it (argument validation, a worker thread), nothing around it."""
    from strata.agents.tools.base import ToolContext
    from strata.agents.tools.builtins import calculator
    from strata.agents.tools.functions import FunctionTool

    tool = FunctionTool(calculator, timeout_s=5)
    context = ToolContext("run_bench", "run_bench:0:call", 5.0)
    samples = []
    for index in range(rounds + 20):
        started = time.perf_counter()
        await tool.invoke({"expression": f"{index} * 2"}, context)
        if index >= 20:
            samples.append((time.perf_counter() - started) * 1000.0)
    return percentiles(samples)


def _ts(value: str | None) -> float:
    return datetime.fromisoformat(value).timestamp() if value else 0.0


def _breakdown(run: dict[str, Any]) -> dict[str, float]:
    """Where a run's time went, from its persisted timestamps (ms): waiting to be claimed, inside model steps
    (Strata's serving path and the mock), inside tool steps, and the engine's bookkeeping between steps."""
    steps = run.get("steps") or []
    model = sum(_ts(s["finished_at"]) - _ts(s["started_at"]) for s in steps if s["kind"] == "model")
    tool = sum(_ts(s["finished_at"]) - _ts(s["started_at"]) for s in steps if s["kind"] == "tool")
    started, finished = _ts(run["started_at"]), _ts(run["finished_at"])
    return {
        "claim": (started - _ts(run["created_at"])) * 1000.0,
        "model_steps": model * 1000.0,
        "tool_steps": tool * 1000.0,
        "between_steps": (finished - started - model - tool) * 1000.0,
    }


def _check(run: dict[str, Any]) -> str | None:
    """Why a run does not count as a completed 5-step run, or None."""
    steps = run.get("steps") or []
    kinds = [s["kind"] for s in steps]
    if run.get("status") != "completed":
        return f"status {run.get('status')}: {run.get('status_reason')}"
    shape = (run.get("steps_taken"), kinds.count("model"), kinds.count("tool"))
    if shape != (MODEL_STEPS, MODEL_STEPS, TOOL_STEPS):
        return f"steps_taken {run.get('steps_taken')}, steps {kinds}"
    if any(s["status"] != "completed" for s in steps):
        return f"a step did not complete: {[(s['kind'], s['status'], s['error']) for s in steps]}"
    return None


async def _strata_runs(
    servers: BenchServers, runs: int, warmup: int, concurrency: int, agent: str = AGENT
) -> dict[str, Any]:
    """Runs through the public API, as a user: `POST /v1/agents/{agent}/runs` with mode=sync waits for the end."""
    url = f"{servers.strata_base}/v1/agents/{agent}/runs"
    headers = {"Authorization": f"Bearer {servers.user_key}"}
    latencies: list[float] = []
    parts: dict[str, list[float]] = {}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits, headers=headers) as client:

        async def one(record: bool) -> None:
            started = time.perf_counter()
            try:
                response = await client.post(url, json={"input": PROMPT, "mode": "sync"})
                elapsed = (time.perf_counter() - started) * 1000.0
                body = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            problem = f"HTTP {response.status_code}" if response.status_code != 200 else _check(body)
            if problem:
                errors.append(problem[:300])
                return
            if record:
                latencies.append(elapsed)
                for name, value in _breakdown(body).items():
                    parts.setdefault(name, []).append(value)
                parts.setdefault("api", []).append(elapsed - (_ts(body["finished_at"]) - _ts(body["created_at"])) * 1e3)

        for _ in range(warmup):
            await one(False)
        warmup_errors = len(errors)
        remaining = iter(range(runs))

        async def worker() -> None:
            for _ in remaining:
                await one(True)

        assert servers.strata is not None
        pid = servers.strata.pid
        cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall0, cpu_seconds(pid) - cpu0
    return {
        "concurrency": concurrency,
        "runs": runs,
        "completed": len(latencies),
        "errors": len(errors),
        "warmup_errors": warmup_errors,
        "error_samples": errors[:3],
        "wall_s": wall,
        "runs_per_s": len(latencies) / wall if wall else 0.0,
        "latency_ms": percentiles(latencies),
        "breakdown_ms": {name: percentiles(values) for name, values in parts.items()},
        "cpu_ms_per_run": cpu * 1000.0 / len(latencies) if latencies else None,
        "cpu_util": cpu / wall if wall else 0.0,
    }


def _langgraph(servers: BenchServers, schema: dict[str, Any], sizes: dict[str, Any], log: Callable) -> dict:
    python = peer_python(log)
    db = servers.workdir / "langgraph-checkpoints.sqlite"
    argv = [
        str(python), str(REPO_ROOT / "bench" / "langgraph_agent.py"), "--url", servers.mock_url, "--db", str(db),
        "--tool-schema", json.dumps(schema), "--runs", str(sizes["runs"]), "--warmup", str(sizes["warmup"]),
        "--concurrency", ",".join(map(str, sizes["concurrency"])), "--durability", "sync,async",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"langgraph_agent failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _overhead(latency_ms: dict[str, float], floor_run_ms: float) -> dict[str, float]:
    """Per model step: (run latency - the run's floor) / 5, at each latency percentile (a monotone map)."""
    return {p: (latency_ms[p] - floor_run_ms) / MODEL_STEPS for p in PCTS if p in latency_ms}


def run(servers: BenchServers, s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    sizes = _sizes(s)
    schema = tool_schema()
    bodies = conversations(schema)
    model_floor = asyncio.run(_model_floor(servers.mock_url, bodies, sizes["floor_rounds"], stream=False))
    stream_floor = asyncio.run(_model_floor(servers.mock_url, bodies, sizes["floor_rounds"], stream=True))
    tool_floor = asyncio.run(_tool_floor(sizes["floor_rounds"] * 2))
    floor_run = MODEL_STEPS * model_floor["p50"] + TOOL_STEPS * tool_floor["p50"]
    log(
        f"agent_steps floor: mock call p50 {model_floor['p50']:.3f} ms (streamed {stream_floor['p50']:.3f}), "
        f"tool p50 {tool_floor['p50']:.3f} ms -> {floor_run:.2f} ms per 5-step run"
    )
    strata = []
    for concurrency in sizes["concurrency"]:
        row = asyncio.run(_strata_runs(servers, sizes["runs"], sizes["warmup"], concurrency))
        row["overhead_per_step_ms"] = _overhead(row["latency_ms"], floor_run)
        strata.append(row)
        log(
            f"agent_steps strata c={concurrency}: {row['runs_per_s']:.1f} runs/s, p50 "
            f"{row['latency_ms'].get('p50', 0):.2f} ms, overhead/step p50 "
            f"{row['overhead_per_step_ms'].get('p50', 0):.2f} ms, CPU {row['cpu_ms_per_run'] or 0:.1f} ms/run, "
            f"errors {row['errors']}"
        )
    code = []
    for concurrency in sizes["concurrency"]:
        row = asyncio.run(_strata_runs(servers, sizes["runs"], sizes["warmup"], concurrency, CODE_AGENT))
        row["overhead_per_step_ms"] = _overhead(row["latency_ms"], floor_run)
        code.append(row)
        log(
            f"agent_steps strata code agent c={concurrency}: {row['runs_per_s']:.1f} runs/s, p50 "
            f"{row['latency_ms'].get('p50', 0):.2f} ms, overhead/step p50 "
            f"{row['overhead_per_step_ms'].get('p50', 0):.2f} ms, errors {row['errors']}"
        )
    langgraph = _langgraph(servers, schema, sizes, log)
    for row in langgraph["results"]:
        row["overhead_per_step_ms"] = _overhead(row["latency_ms"], floor_run)
        log(
            f"agent_steps langgraph ({row['durability']}) c={row['concurrency']}: {row['runs_per_s']:.1f} runs/s, "
            f"p50 {row['latency_ms'].get('p50', 0):.2f} ms, overhead/step p50 "
            f"{row['overhead_per_step_ms'].get('p50', 0):.2f} ms, errors {row['errors']}"
        )
    return {
        "agent": AGENT,
        "model_steps": MODEL_STEPS,
        "tool_steps": TOOL_STEPS,
        "sizes": sizes,
        "floor": {
            "model_call_ms": model_floor,
            "model_call_streamed_ms": stream_floor,
            "tool_ms": tool_floor,
            "per_run_ms": floor_run,
        },
        "strata": strata,
        "strata_code": code,
        "langgraph": langgraph,
    }


def _best_langgraph(result: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    """LangGraph's fastest durability mode at this concurrency: the ratio is taken against its best."""
    rows = [r for r in result["langgraph"]["results"] if r["concurrency"] == concurrency and r["completed"]]
    return max(rows, key=lambda r: r["runs_per_s"]) if rows else None


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    result = results.get("scenarios", {}).get(NAME)
    if not result:
        return []
    where = f"4. Agent-step cost ({result['model_steps']} model + {result['tool_steps']} tool steps, SQLite)"
    if result["sizes"]["runs"] < 100:
        where += " (quick)"
    out = []
    floor = result["floor"]["per_run_ms"]
    first = result["strata"][0]
    c = first["concurrency"]
    lg = _best_langgraph(result, c)
    over = first["overhead_per_step_ms"].get("p50")
    lg_over = f"; LangGraph ({lg['durability']}) {fmt(lg['overhead_per_step_ms'].get('p50'))} ms" if lg else ""
    detail = (
        f"{fmt(over)} ms = (run p50 {fmt(first['latency_ms'].get('p50'))} - floor {fmt(floor)} ms) / "
        f"{result['model_steps']}{lg_over}"
    )
    out.append((where, f"Strata overhead per model step p50 (c={c})", "<= 1 ms", detail,
                verdict(over is not None and over <= TARGET_OVERHEAD_MS)))  # fmt: skip
    for row in result["strata"]:
        lg = _best_langgraph(result, row["concurrency"])
        if lg is None:
            out.append((where, f"completed runs/s vs LangGraph (c={row['concurrency']})", f">= {TARGET_RATIO:g}x",
                        f"Strata {row['runs_per_s']:.1f}; LangGraph: no completed runs", "**MISS**"))  # fmt: skip
            continue
        ratio = row["runs_per_s"] / lg["runs_per_s"]
        detail = (
            f"Strata {row['runs_per_s']:.1f} / LangGraph ({lg['durability']}) {lg['runs_per_s']:.1f} runs/s "
            f"= {ratio:.1f}x"
        )
        out.append((where, f"completed runs/s vs LangGraph (c={row['concurrency']})", f">= {TARGET_RATIO:g}x",
                    detail, verdict(ratio >= TARGET_RATIO)))  # fmt: skip
    failed = sum(r["errors"] + r["warmup_errors"] for r in result["strata"])
    lg_failed = sum(r["errors"] for r in result["langgraph"]["results"])
    out.append((where, "failed or short runs", "0", f"Strata {failed}, LangGraph {lg_failed}",
                verdict(failed == 0 and lg_failed == 0)))  # fmt: skip
    return out


def _trio(values: dict[str, float]) -> str:
    return " / ".join(fmt(values.get(p)) for p in ("p50", "p99"))


def section(results: dict[str, Any]) -> list[str]:
    result = results.get("scenarios", {}).get(NAME)
    if not result:
        return []
    floor = result["floor"]
    lines = [
        "",
        f"### Agent-step cost ({result['sizes']['runs']} runs per point after {result['sizes']['warmup']} warm-up, "
        f"{result['model_steps']} model + {result['tool_steps']} tool steps per run)",
        "",
        f"Floor, measured directly: a mock model call p50 {fmt(floor['model_call_ms']['p50'], 3)} ms "
        f"(p99 {fmt(floor['model_call_ms']['p99'], 3)}; streamed as Strata asks: p50 "
        f"{fmt(floor['model_call_streamed_ms']['p50'], 3)} ms), a calculator call p50 "
        f"{fmt(floor['tool_ms']['p50'], 3)} ms: {fmt(floor['per_run_ms'])} ms of unavoidable work per run.",
        "",
        "| System | Durability | Concurrency | Completed runs/s | Run latency p50 / p99 (ms) | "
        "Overhead per model step p50 / p99 (ms) | CPU per run (ms) | Failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["strata"]:
        lines.append(
            f"| Strata (HTTP API, mode=sync) | each step committed before the next | {row['concurrency']} | "
            f"{row['runs_per_s']:.1f} | {_trio(row['latency_ms'])} | {_trio(row['overhead_per_step_ms'])} | "
            f"{fmt(row['cpu_ms_per_run'], 1)} | {row['errors'] + row['warmup_errors']} |"
        )
    for row in result.get("strata_code", []):
        lines.append(
            f"| Strata code agent (`bench/code_agent.py`) | each call journaled before the next | "
            f"{row['concurrency']} | {row['runs_per_s']:.1f} | {_trio(row['latency_ms'])} | "
            f"{_trio(row['overhead_per_step_ms'])} | {fmt(row['cpu_ms_per_run'], 1)} | "
            f"{row['errors'] + row['warmup_errors']} |"
        )
    for row in result["langgraph"]["results"]:
        lines.append(
            f"| LangGraph (in process) | `{row['durability']}` | {row['concurrency']} | {row['runs_per_s']:.1f} | "
            f"{_trio(row['latency_ms'])} | {_trio(row['overhead_per_step_ms'])} | "
            f"{fmt(row['cpu_ms_per_run'], 1)} | {row['errors']} |"
        )
    lines += [
        "",
        "Where a Strata run's time went, from its persisted timestamps (p50 per run, ms): waiting to be claimed,"
        " inside the 5 model steps (Strata's serving path and the mock), inside the 4 tool steps, the engine's"
        " bookkeeping between steps (commits, reads), and the API around it (create, wait, respond):",
        "",
        "| Concurrency | Claim | Model steps | Tool steps | Between steps | API |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["strata"]:
        b = row["breakdown_ms"]
        cells = " | ".join(
            fmt(b.get(k, {}).get("p50")) for k in ("claim", "model_steps", "tool_steps", "between_steps", "api")
        )
        lines.append(f"| {row['concurrency']} | {cells} |")
    lines.append("")
    lines.append(
        "LangGraph's own time inside its model calls, p50 per run: "
        + ", ".join(
            f"{r['durability']} c={r['concurrency']}: {fmt(r['model_call_ms_per_run'].get('p50'))} ms"
            for r in result["langgraph"]["results"]
        )
        + "."
    )
    return lines


METHOD = [
    "**Agent-step cost** (`bench/agent_steps.py`): the mock plays a scripted model: a request carrying `tools` gets"
    " one call to the first tool (arguments valid for it, different each turn) until the conversation holds 4"
    " tool results, then a text answer, streamed or not as asked, every chunk written at once (no pacing); so a"
    " run is 5 model calls and 4 tool calls. Strata runs agent"
    " `bench-agent` (the built-in `calculator` tool, no system prompt) durable on SQLite in the bench data dir;"
    " the bench process drives it through the public API as a user would: `POST /v1/agents/bench-agent/runs`"
    " with `mode: sync` (the API waits for the run's end and returns it with its steps), checking that each run"
    " completed with 5 model and 4 tool steps, all completed. Run latency is the client's time for that request.",
    "**LangGraph peer** (`bench/langgraph_agent.py`, in `.venv-peers`): the same loop as a `StateGraph` over"
    " OpenAI-format message dicts: a model node posting the conversation and the *same* tool schema to the same"
    " mock with one keep-alive `httpx.AsyncClient`, a tool node running the same arithmetic, a conditional edge;"
    " compiled with `AsyncSqliteSaver` on a SQLite file, a `thread_id` per run, measured with"
    ' `durability="sync"` (each checkpoint written before the next step: Strata\'s guarantee) and `"async"`'
    " (LangGraph's default). It runs in process (no HTTP API in front of it), which favours it. The runs/s ratio"
    " is taken against LangGraph's faster mode at each concurrency.",
    "**Overhead per model step** = (run latency - 5 x mock call floor - 4 x tool floor) / 5, for both systems,"
    " at each latency percentile. The floors are measured directly in the same run: the mock's per-call time"
    " (p50 over the same five requests, sent one at a time from a keep-alive `httpx.AsyncClient`, non-streamed)"
    " and the calculator's own invocation time (p50). Runs/s = completed runs / wall time of N runs by c"
    " closed-loop workers after unrecorded warm-up runs; CPU per run is the Strata process's (or the LangGraph"
    " process's) utime + stime over the measured runs divided by the runs.",
]
