"""The agent-step scenario's peer: the same tool loop in LangGraph, run by the peers' interpreter (`.venv-peers`).

`python bench/langgraph_agent.py --url http://127.0.0.1:PORT/v1/chat/completions --db FILE --tool-schema JSON
--runs 200 --concurrency 1,8 --durability sync,async` prints one JSON line: for each (durability, concurrency),
completed runs/s, run latency percentiles, model steps per run, time inside the model HTTP calls and the tool,
and this process's CPU per run.

The graph is LangGraph at its leanest, to be fair to it: a `StateGraph` whose state is a list of OpenAI-format
message dicts (no LangChain message classes), a model node posting the conversation and the tool schema to the
bench mock (`httpx.AsyncClient`, one keep-alive client for the process), a tool node running the calculator
(a sync node: LangGraph runs it in its executor, as Strata runs a sync function tool in a thread) and a
conditional edge back to the model while the last message has tool calls. It is compiled with
`AsyncSqliteSaver` on a SQLite file, one `thread_id` per run, so every super-step is checkpointed:
`durability="sync"` writes each checkpoint before the next step starts (Strata's guarantee), `"async"`
(LangGraph's default) writes it while the next step runs.

Self-contained on purpose: it runs where Strata and the bench package are not installed.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import math
import operator
import resource
import time
import uuid
from importlib.metadata import version
from typing import Annotated, Any, TypedDict

import httpx
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph

MODEL = "bench-model"
PROMPT = "Work it out with the calculator, step by step."


class AgentState(TypedDict):
    messages: Annotated[list[dict[str, Any]], operator.add]


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("unsupported expression")


def calculator(expression: str) -> str:
    """The same side-effect-free arithmetic the Strata agent's built-in calculator does (ast, never eval)."""
    return str(_evaluate(ast.parse(expression, mode="eval").body))


class Agent:
    """The graph and what it measured: seconds inside model calls and inside the tool, per thread."""

    def __init__(self, url: str, tool_schema: dict[str, Any], client: httpx.AsyncClient) -> None:
        self.url = url
        self.tools = [tool_schema]
        self.client = client
        self.model_s: dict[str, float] = {}
        self.tool_s: dict[str, float] = {}

    async def model(self, state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        thread = config["configurable"]["thread_id"]
        body = {"model": MODEL, "messages": state["messages"], "tools": self.tools, "tool_choice": "auto"}
        started = time.perf_counter()
        response = await self.client.post(self.url, json=body)
        response.raise_for_status()
        message = response.json()["choices"][0]["message"]
        self.model_s[thread] = self.model_s.get(thread, 0.0) + time.perf_counter() - started
        return {"messages": [message]}

    def tool(self, state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        thread = config["configurable"]["thread_id"]
        started = time.perf_counter()
        results = []
        for call in state["messages"][-1].get("tool_calls") or ():
            arguments = json.loads(call["function"]["arguments"] or "{}")
            results.append({"role": "tool", "tool_call_id": call["id"], "content": calculator(**arguments)})
        self.tool_s[thread] = self.tool_s.get(thread, 0.0) + time.perf_counter() - started
        return {"messages": results}

    def graph(self) -> StateGraph:
        graph = StateGraph(AgentState)
        graph.add_node("model", self.model)
        graph.add_node("tools", self.tool)
        graph.add_edge(START, "model")
        graph.add_conditional_edges(
            "model", lambda state: "tools" if state["messages"][-1].get("tool_calls") else END, ["tools", END]
        )
        graph.add_edge("tools", "model")
        return graph


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 with min/max/mean (as bench.loadgen)."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{p}": ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1] for p in (50, 90, 99)}
    return {**out, "min": ordered[0], "max": ordered[-1], "mean": sum(ordered) / len(ordered)}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    agent: Agent, app: Any, runs: int, warmup: int, concurrency: int, durability: str, expect_steps: int
) -> dict:
    """`warmup` unrecorded runs, then `runs` runs by `concurrency` workers, each run a fresh thread."""
    latencies: list[float] = []
    model_ms: list[float] = []
    tool_ms: list[float] = []
    steps: list[int] = []
    errors: list[str] = []

    async def one(record: bool) -> None:
        thread = f"run-{uuid.uuid4().hex}"
        config = {"configurable": {"thread_id": thread}}
        started = time.perf_counter()
        try:
            final = await app.ainvoke(
                {"messages": [{"role": "user", "content": PROMPT}]}, config, durability=durability
            )
        except Exception as exc:  # counted and reported: a failed run is not a completed one
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        elapsed = time.perf_counter() - started
        model_steps = sum(1 for m in final["messages"] if m.get("role") == "assistant")
        if model_steps != expect_steps:
            errors.append(f"{model_steps} model steps, expected {expect_steps}")
            return
        if record:
            latencies.append(elapsed * 1000.0)
            model_ms.append(agent.model_s.pop(thread, 0.0) * 1000.0)
            tool_ms.append(agent.tool_s.pop(thread, 0.0) * 1000.0)
            steps.append(model_steps)

    for _ in range(warmup):
        await one(False)
    errors.clear()
    remaining = iter(range(runs))

    async def worker() -> None:
        for _ in remaining:
            await one(True)

    cpu0, wall0 = cpu_s(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall0, cpu_s() - cpu0
    return {
        "durability": durability,
        "concurrency": concurrency,
        "runs": runs,
        "completed": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "runs_per_s": len(latencies) / wall if wall else 0.0,
        "latency_ms": percentiles(latencies),
        "model_steps": sorted(set(steps)),
        "model_call_ms_per_run": percentiles(model_ms),
        "tool_ms_per_run": percentiles(tool_ms),
        "cpu_ms_per_run": cpu / len(latencies) * 1000.0 if latencies else None,
        "cpu_util": cpu / wall if wall else 0.0,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(limits=limits, timeout=30.0) as client,
        AsyncSqliteSaver.from_conn_string(args.db) as saver,
    ):
        await saver.setup()
        agent = Agent(args.url, json.loads(args.tool_schema), client)
        app = agent.graph().compile(checkpointer=saver)
        results = []
        for durability in args.durability.split(","):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                results.append(
                    await measure(agent, app, args.runs, args.warmup, concurrency, durability, args.expect_steps)
                )
    versions = {p: version(p) for p in ("langgraph", "langgraph-checkpoint-sqlite", "aiosqlite", "httpx")}
    return {"versions": versions, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the mock's /v1/chat/completions")
    parser.add_argument("--db", required=True, help="the SQLite checkpoint file")
    parser.add_argument("--tool-schema", required=True, help="the calculator's OpenAI tool schema (JSON)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--concurrency", default="1,8", help="comma-separated")
    parser.add_argument("--expect-steps", type=int, default=5, help="model steps a run must take to count")
    parser.add_argument("--durability", default="sync,async", help="comma-separated LangGraph durability modes")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        summary = asyncio.run(main_async(args))
    else:
        summary = uvloop.run(main_async(args))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
