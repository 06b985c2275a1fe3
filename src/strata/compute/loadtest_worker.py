"""One step of `strata loadtest`, in a process of its own: a StepSpec as JSON on stdin, every request's
outcome as JSON on stdout. `python -m strata.compute.loadtest_worker < step.json`."""

from __future__ import annotations

import asyncio
import random
import resource
import sys
import time
from dataclasses import asdict
from typing import Any

import aiohttp
import orjson

from strata.compute.loadtest import Outcome, StepSpec, prompt_text

clock = time.perf_counter


async def _one(session: aiohttp.ClientSession, spec: StepSpec, index: int, started: float) -> Outcome:
    """One streamed chat completion; times count from `started` (its scheduled time in an open loop)."""
    body = {
        "model": spec.target.model,
        "messages": [{"role": "user", "content": prompt_text(spec.prompts[index], index)}],
        "max_tokens": spec.max_tokens[index],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {spec.target.api_key}"} if spec.target.api_key else {}
    first: float | None = None
    last: float | None = None
    gaps: list[float] = []
    chunks = 0
    completion: int | None = None
    try:
        async with session.post(spec.target.url.rstrip("/") + "/chat/completions", json=body, headers=headers) as r:
            if r.status != 200:
                text = (await r.text())[:200]
                return Outcome(False, r.status, None, clock() - started, [], 0, f"HTTP {r.status}: {text}")
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = orjson.loads(data)
                if event.get("error"):
                    message = str(event["error"].get("message", event["error"]))[:200]
                    return Outcome(False, 200, None, clock() - started, [], 0, f"stream error: {message}")
                if event.get("usage"):
                    completion = event["usage"].get("completion_tokens")
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                    now = clock()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - (last or now))
                    last = now
                    chunks += 1
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return Outcome(False, 0, None, clock() - started, [], 0, f"{type(exc).__name__}: {exc}"[:200])
    ttft = first - started if first is not None else None
    return Outcome(True, 200, ttft, clock() - started, gaps, completion if completion is not None else chunks)


async def run_step(spec: StepSpec) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    outcomes: list[Outcome] = []
    lags: list[float] = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = clock()
        deadline = t0 + spec.duration_s
        count = len(spec.prompts)
        if spec.kind == "rate":
            rng = random.Random(f"arrivals:{spec.load}")
            tasks = []
            at = t0
            for index in range(count):
                at += rng.expovariate(spec.load)
                if at >= deadline:
                    break
                delay = at - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                lags.append(max(clock() - at, 0.0))
                tasks.append(asyncio.create_task(_one(session, spec, index, at)))
            outcomes = list(await asyncio.gather(*tasks))
        else:
            counter = iter(range(count))

            async def client() -> None:
                for index in counter:
                    if clock() >= deadline:
                        return
                    outcomes.append(await _one(session, spec, index, clock()))

            await asyncio.gather(*(client() for _ in range(int(spec.load))))
        wall = clock() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"outcomes": [asdict(o) for o in outcomes], "wall_s": wall, "lags_s": lags, "cpu_s": cpu}


def main() -> None:
    spec = StepSpec.of(orjson.loads(sys.stdin.buffer.read()))
    result = asyncio.run(run_step(spec))
    sys.stdout.buffer.write(orjson.dumps(result))


if __name__ == "__main__":
    main()
