"""The load generator: a separate process (aiohttp on uvloop, one large connection pool) that prints a JSON summary.

Modes:
- `open`: a fixed request rate (open loop). Request i is *scheduled* at t0 + i / rate and its latency is
  measured from that scheduled time, not from when it was actually sent: if the generator or the server
  falls behind, the wait shows up as latency instead of being hidden (no coordinated omission). The
  summary also reports how late requests left (`send_lag_ms`), which shows whether the generator kept up.
- `closed`: a fixed number of concurrent workers, each sending its next request when the last one answered
  (throughput at saturation).
- `stream`: N concurrent SSE streams; records the arrival time of every event and reports the gaps between
  consecutive content chunks, time to first chunk, and how many streams completed with every chunk.

The generator's own CPU time is reported (`loadgen_cpu_s`): with it under one core while the server under
test is saturated, the generator is not the bottleneck. The direct-to-mock runs show its ceiling.

`python -m bench.loadgen --url http://127.0.0.1:8000/v1/chat/completions --mode open --rate 100 --duration 10`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import resource
import sys
import time
from typing import Any

import aiohttp
import orjson

# uvloop's loop.time() ticks in whole milliseconds: every measurement uses this clock instead.
clock = time.perf_counter

REQUEST_BODY = {
    "model": "bench-model",
    "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    "max_tokens": 32,
}


def percentiles(values: list[float], points: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles (and min/max/mean) of `values`, keyed like `p50`, `p99.9`."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for p in points:
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        out[f"p{p:g}"] = ordered[rank - 1]
    out["min"] = ordered[0]
    out["max"] = ordered[-1]
    out["mean"] = sum(ordered) / len(ordered)
    return out


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Recorder:
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.ok = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.statuses: dict[str, int] = {}
        # Refusals (429, 503) are errors too; overload measurements also want how fast they came and whether
        # they told the client when to come back.
        self.refused_ms: list[float] = []
        self.service_ms: list[float] = []
        self.refused_service_ms: list[float] = []
        self.refused_without_retry_after = 0

    def error(self, what: str) -> None:
        self.errors += 1
        self.statuses[what] = self.statuses.get(what, 0) + 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


_REFUSALS = frozenset({429, 503})


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, rec: Recorder, start: float) -> None:
    """`start`: when the request was due (open loop) or sent (closed loop). The time from the actual send is
    kept too (`service_ms`): when the generator itself falls behind, or waits for a pooled connection, the two
    differ by that wait. With a bounded pool, "sent" is when the headers went out on a connection."""
    sent = clock()
    timing: dict[str, float] = {}
    try:
        async with session.post(url, data=body, trace_request_ctx=timing) as response:
            sent = timing.get("sent", sent)
            await response.read()
            if response.status != 200:
                rec.error(f"HTTP {response.status}")
                if response.status in _REFUSALS:
                    rec.refused_ms.append((clock() - start) * 1000.0)
                    rec.refused_service_ms.append((clock() - sent) * 1000.0)
                    rec.refused_without_retry_after += "Retry-After" not in response.headers
                return
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        rec.error(type(exc).__name__)
        return
    rec.ok += 1
    done = clock()
    rec.latencies_ms.append((done - start) * 1000.0)
    rec.service_ms.append((done - sent) * 1000.0)


async def open_loop(session: aiohttp.ClientSession, url: str, body: bytes, rate: float, duration: float) -> dict:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    lags_ms: list[float] = []
    tasks: set[asyncio.Task] = set()
    total = int(rate * duration)
    t0 = clock() + 0.01
    for i in range(total):
        scheduled = t0 + i / rate
        delay = scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        lags_ms.append(max(0.0, (clock() - scheduled) * 1000.0))
        task = loop.create_task(_post(session, url, body, rec, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_in = clock() - t0
    if tasks:
        await asyncio.gather(*tasks)
    elapsed = clock() - t0
    return {
        "offered_rps": rate,
        "sent": total,
        "send_duration_s": sent_in,
        "achieved_rps": rec.ok / elapsed if elapsed else 0.0,
        "send_lag_ms": percentiles(lags_ms),
        **_summary(rec, elapsed),
    }


async def closed_loop(
    session: aiohttp.ClientSession, url: str, body: bytes, concurrency: int, duration: float, warmup: float
) -> dict:

    measuring = Recorder()
    warm = Recorder()
    start = clock()
    measure_from = start + warmup
    deadline = measure_from + duration

    async def worker() -> None:
        while True:
            now = clock()
            if now >= deadline:
                return
            await _post(session, url, body, measuring if now >= measure_from else warm, now)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = clock() - measure_from
    return {
        "concurrency": concurrency,
        "achieved_rps": measuring.ok / elapsed if elapsed else 0.0,
        "warmup_errors": warm.errors,
        "warmup_ok": warm.ok,
        **_summary(measuring, elapsed),
    }


async def streams(
    session: aiohttp.ClientSession, url: str, body: bytes, count: int, expect_chunks: int, ramp_s: float
) -> dict:

    rec = Recorder()
    gaps_ms: list[float] = []
    ttfc_ms: list[float] = []
    complete = 0
    short = 0
    flowing = [0, 0]  # streams between their first chunk and their end: now, most at once

    async def one(index: int) -> None:
        nonlocal complete, short
        await asyncio.sleep(ramp_s * index / max(1, count))
        start = clock()
        arrivals: list[float] = []
        done = False
        try:
            async with session.post(url, data=body) as response:
                if response.status != 200:
                    await response.read()
                    rec.error(f"HTTP {response.status}")
                    return
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    if line.startswith(b"data: [DONE]"):
                        done = True
                        break
                    if b'"delta"' in line:  # content chunks; the usage chunk has no choices
                        arrivals.append(clock())
                        if len(arrivals) == 1:
                            flowing[0] += 1
                            flowing[1] = max(flowing[1], flowing[0])
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            rec.error(type(exc).__name__)
            return
        finally:
            if arrivals:
                flowing[0] -= 1
        if not done:
            rec.error("no [DONE]")
            return
        if len(arrivals) != expect_chunks:
            short += 1
            rec.error(f"{len(arrivals)} of {expect_chunks} chunks")
            return
        complete += 1
        rec.ok += 1
        rec.latencies_ms.append((clock() - start) * 1000.0)
        ttfc_ms.append((arrivals[0] - start) * 1000.0)
        gaps_ms.extend((b - a) * 1000.0 for a, b in itertools.pairwise(arrivals))

    t0 = clock()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = clock() - t0
    return {
        "streams": count,
        "expected_chunks": expect_chunks,
        "complete": complete,
        "short": short,
        "peak_concurrent": flowing[1],
        "gap_ms": percentiles(gaps_ms),
        "ttfc_ms": percentiles(ttfc_ms),
        **_summary(rec, elapsed),
    }


def _summary(rec: Recorder, elapsed: float) -> dict[str, Any]:
    return {
        "ok": rec.ok,
        "errors": rec.errors,
        "error_kinds": rec.statuses,
        "error_samples": rec.error_samples,
        "elapsed_s": elapsed,
        "latency_ms": percentiles(rec.latencies_ms),
        "refused": len(rec.refused_ms),
        "refused_ms": percentiles(rec.refused_ms),
        "service_ms": percentiles(rec.service_ms),
        "refused_service_ms": percentiles(rec.refused_service_ms),
        "refused_without_retry_after": rec.refused_without_retry_after,
    }


async def _headers_sent(_session: Any, context: Any, _params: Any) -> None:
    if isinstance(context.trace_request_ctx, dict):
        context.trace_request_ctx["sent"] = clock()


async def run(args: argparse.Namespace) -> dict:
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    request = dict(REQUEST_BODY)
    if args.mode == "stream":
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}
    body = orjson.dumps(request)
    # --connections 0: a new connection whenever every open one is busy (a crowd of clients); N: at most N
    # keep-alive connections, requests beyond them wait for one (a fleet of pooled clients, like the SDKs').
    connector = aiohttp.TCPConnector(
        limit=args.connections, limit_per_host=args.connections, ttl_dns_cache=None, keepalive_timeout=60
    )
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    cpu0, wall0 = _cpu_s(), time.monotonic()
    traces = []
    if args.connections:  # only then can a request wait for a connection after it was due
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_headers_sent)
        traces.append(trace)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout, trace_configs=traces
    ) as session:
        if args.mode == "open":
            if args.warmup > 0:  # opens the connections the rate needs; not recorded
                await open_loop(session, args.url, body, args.rate, args.warmup)
            cpu0, wall0 = _cpu_s(), time.monotonic()
            result = await open_loop(session, args.url, body, args.rate, args.duration)
        elif args.mode == "closed":
            result = await closed_loop(session, args.url, body, args.concurrency, args.duration, args.warmup)
        else:
            result = await streams(session, args.url, body, args.streams, args.expect_chunks, args.ramp_s)
    cpu, wall = _cpu_s() - cpu0, time.monotonic() - wall0
    result["mode"] = args.mode
    result["loadgen_cpu_s"] = cpu
    result["loadgen_cpu_util"] = cpu / wall if wall else 0.0  # 1.0 = one core busy
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Strata benchmark load generator (prints JSON)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key", default=os.environ.get("BENCH_API_KEY"))
    parser.add_argument("--mode", choices=["open", "closed", "stream"], required=True)
    parser.add_argument("--rate", type=float, default=100.0, help="open: requests per second")
    parser.add_argument("--concurrency", type=int, default=32, help="closed: concurrent workers")
    parser.add_argument("--streams", type=int, default=50, help="stream: concurrent streams")
    parser.add_argument("--expect-chunks", type=int, default=100, help="stream: content chunks per stream")
    parser.add_argument("--ramp-s", type=float, default=1.0, help="stream: spread the stream starts over this long")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unrecorded load first")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=0, help="connection pool size (0: unbounded)")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
