"""CPU work in the process pool keeps the event loop answering: measured against the same work inline.

Also: the pool's bounds and deadlines, the `read_document` tool's directory jail, and token counts that
do not change with where they are computed.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from strata.agents.tools.base import ToolContext, ToolError, ToolRisk
from strata.agents.tools.read_document import ReadDocumentTool
from strata.compute.documents import DocumentError, extract_text
from strata.compute.offload import CpuPool, CpuPoolBusy, CpuPoolError, CpuPoolTimeout
from strata.compute.tokens import PooledTokenCounter, count_tokens
from strata.serving.usage import ApproximateTokenCounter
from tests.support.strata_process import descendants

T = TypeVar("T")
CONTEXT = ToolContext(run_id="run-1", idempotency_key="run-1:1:1", timeout_s=60)
PING_INTERVAL_S = 0.05
# About 4 MB of HTML: between one and a few seconds of pure-Python parsing, depending on the machine.
ROW = (
    '<div class="row"><h2>Section &amp; title</h2><p>Some <b>bold</b> text &mdash; with <a href="#x">a link</a> '
    "and &lt;entities&gt;.</p><script>var a = 1 < 2;</script><ul><li>one</li><li>two</li></ul></div>\n"
)
LARGE_HTML = ("<!DOCTYPE html><html><body>" + ROW * 20_000 + "</body></html>").encode()


@pytest.fixture
async def pool() -> AsyncIterator[CpuPool]:
    async with CpuPool(max_workers=2, max_queued=8) as started:
        yield started


# --- the event loop keeps answering while a large document is parsed --------------------------------


@dataclass(frozen=True)
class Ping:
    sent: float
    answered: float

    @property
    def latency(self) -> float:
        return self.answered - self.sent


def ping_until(port: int, stop: threading.Event, pings: list[Ping]) -> None:
    """A client outside the event loop (its own thread, blocking sockets): it sees what a user would."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        while not stop.is_set():
            sent = time.perf_counter()
            connection.request("GET", "/ping")
            response = connection.getresponse()
            assert response.read() == b"pong"
            pings.append(Ping(sent, time.perf_counter()))
            stop.wait(PING_INTERVAL_S)
    finally:
        connection.close()


@pytest.fixture
async def server(pool: CpuPool) -> AsyncIterator[int]:
    """A tiny app on this test's event loop: /parse parses LARGE_HTML in the pool or inline; /ping answers."""

    async def parse(request: web.Request) -> web.Response:
        if request.query["mode"] == "pool":
            result = await pool.run(extract_text, LARGE_HTML, "text/html", None, 10**9)
        else:
            result = extract_text(LARGE_HTML, "text/html", None, 10**9)  # what the pool exists to avoid
        return web.json_response({"chars": result.chars})

    async def ping(_request: web.Request) -> web.Response:
        return web.Response(text="pong")

    app = web.Application()
    app.router.add_get("/parse", parse)
    app.router.add_get("/ping", ping)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def parse_while_pinging(port: int, mode: str) -> tuple[float, list[Ping], int]:
    """One parse request, with pings every 50 ms before, during and after it. Returns the parse's
    duration, the pings whose lifetime overlapped it, and the parsed length."""
    pings: list[Ping] = []
    stop = threading.Event()
    pinger = threading.Thread(target=ping_until, args=(port, stop, pings), daemon=True)
    pinger.start()
    try:
        while len(pings) < 3:  # pings are flowing before the parse starts
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            async with session.get(f"http://127.0.0.1:{port}/parse", params={"mode": mode}) as response:
                assert response.status == 200
                chars = (await response.json())["chars"]
            finished = time.perf_counter()
        after = len(pings)
        while len(pings) < after + 2:  # and after it ends
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.to_thread(pinger.join)
    during = [ping for ping in pings if ping.answered >= started and ping.sent <= finished]
    return finished - started, during, chars


async def test_a_large_parse_in_the_pool_does_not_stall_the_event_loop(server: int) -> None:
    pool_s, pool_pings, pool_chars = await parse_while_pinging(server, "pool")
    inline_s, inline_pings, inline_chars = await parse_while_pinging(server, "inline")

    assert pool_chars == inline_chars > 1_000_000
    # The document must be big enough to make the comparison meaningful: many ping intervals long.
    assert inline_s > 10 * PING_INTERVAL_S, f"the parse took only {inline_s:.3f}s: make the document larger"

    # Inline: the loop is blocked, so a ping sent during the parse waits for (most of) the whole parse.
    # This is what proves the test can fail.
    inline_worst = max(ping.latency for ping in inline_pings)
    assert inline_worst > inline_s / 2, (inline_worst, inline_s)

    # In the pool: pings keep being answered all through the parse, each far faster than the parse.
    pool_worst = max(ping.latency for ping in pool_pings)
    assert len(pool_pings) >= pool_s / PING_INTERVAL_S / 4, (len(pool_pings), pool_s)
    assert pool_worst < pool_s / 5, (pool_worst, pool_s)
    assert pool_worst < inline_worst / 5, (pool_worst, inline_worst)


# --- the pool's own guarantees ---------------------------------------------------------------------


async def test_results_and_worker_exceptions_cross_the_process_boundary(pool: CpuPool) -> None:
    result = await pool.run(extract_text, b"<html><p>a &amp; b</p></html>", None, None)
    assert result.text == "a & b"
    assert await pool.run(os.getpid) != os.getpid()
    with pytest.raises(DocumentError, match="binary"):
        await pool.run(extract_text, bytes(range(256)) * 4, None, None)


async def test_functions_that_cannot_be_pickled_are_refused_up_front(pool: CpuPool) -> None:
    def local() -> int:
        return 1

    with pytest.raises(TypeError, match="module-level"):
        await pool.run(lambda: 1)
    with pytest.raises(TypeError, match="module-level"):
        await pool.run(local)


async def test_beyond_workers_plus_queue_jobs_are_refused() -> None:
    async with CpuPool(max_workers=1, max_queued=1) as small:
        assert small.capacity == 2
        running = [asyncio.create_task(small.run(time.sleep, 0.5)) for _ in range(2)]
        await asyncio.sleep(0)  # both submitted
        assert small.in_flight == 2
        with pytest.raises(CpuPoolBusy, match="full"):
            await small.run(os.getpid)
        await asyncio.gather(*running)
        assert small.in_flight == 0
        assert await small.run(os.getpid)  # room again


async def test_a_runaway_job_is_interrupted_in_its_worker_and_frees_it() -> None:
    sleep_s = 20.0
    async with CpuPool(max_workers=1, max_queued=4) as single:
        with pytest.raises(CpuPoolTimeout):
            await single.run(time.sleep, sleep_s, timeout_s=0.3)
        # The only worker was running the sleep: the next job gets it back long before the sleep would end.
        started = time.perf_counter()
        assert await single.run(os.getpid)
        assert time.perf_counter() - started < sleep_s / 4
        assert single.in_flight == 0


async def test_a_dead_worker_is_reported_and_the_pool_recovers() -> None:
    async with CpuPool(max_workers=1) as single:
        with pytest.raises(CpuPoolError, match="died"):
            await single.run(os._exit, 3)
        assert await single.run(os.getpid)
        assert single.in_flight == 0


OWNER_SCRIPT = """
import asyncio, os, sys
from strata.compute.offload import CpuPool

async def main():
    async with CpuPool(max_workers=2) as pool:
        await pool.run(os.getpid)
        print("started", flush=True)
        await asyncio.sleep(60)

if __name__ == "__main__":
    asyncio.run(main())
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (one that ended but that its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_pools_processes_die_with_a_process_killed_by_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        assert "started\n" in iter(owner.stdout.readline, "")  # after the pool's own log line
        pool_processes = descendants(owner.pid)
        assert len(pool_processes) >= 3  # the fork server and its two workers
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while (left := {pid for pid in pool_processes if _running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"pool processes outlived their owner: {sorted(left)}"


async def test_a_pool_runs_nothing_before_start_or_after_shutdown() -> None:
    idle = CpuPool(max_workers=1)
    assert idle.start_method in ("forkserver", "spawn")
    with pytest.raises(CpuPoolError, match="not started"):
        await idle.run(os.getpid)
    await idle.start()
    await idle.shutdown()
    with pytest.raises(CpuPoolError, match="shut down"):
        await idle.run(os.getpid)
    with pytest.raises(ValueError, match="fork"):
        CpuPool(start_method="fork")


# --- read_document ---------------------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "notes.md").write_text("# Notes\n\n- **first** point\n- second point\n")
    (allowed / "sub").mkdir()
    (allowed / "sub" / "page.html").write_text("<html><script>x()</script><p>inner &amp; page</p></html>")
    (outside / "secret.txt").write_text("TOP SECRET")
    return allowed, outside


async def test_read_document_reads_an_allowed_file(pool: CpuPool, dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    tool = ReadDocumentTool(pool, [allowed], timeout_s=30)
    assert (tool.name, tool.spec.risk, tool.spec.timeout_s) == ("read_document", ToolRisk.LOW, 30)

    result = await tool.invoke({"path": str(allowed / "notes.md")}, CONTEXT)
    header, _, text = result.content.partition("\n\n")
    assert header == "[document: type=text/markdown; pages=n/a; chars=35; truncated=no]"
    assert text == "Notes\n\n- first point\n- second point"
    assert result.metadata == {"media_type": "text/markdown", "pages": None, "chars": 35, "truncated": False}

    relative = await tool.invoke({"path": "sub/page.html", "max_chars": 5}, CONTEXT)
    assert (
        relative.content
        == "[document: type=text/html; pages=n/a; chars=5; truncated=yes (cut at 5 characters)]\n\ninner"
    )


async def test_read_document_reads_inline_content(pool: CpuPool) -> None:
    tool = ReadDocumentTool(pool, timeout_s=30)
    encoded = base64.b64encode(b"<!doctype html><title>T</title><p>body</p>").decode()
    result = await tool.invoke({"content_base64": encoded}, CONTEXT)
    assert result.content.endswith("\n\nT\n\nbody")
    with pytest.raises(ToolError, match="not enabled"):
        await tool.invoke({"path": "/etc/passwd"}, CONTEXT)
    with pytest.raises(ToolError, match="binary"):
        await tool.invoke({"content_base64": base64.b64encode(bytes(range(256))).decode()}, CONTEXT)
    with pytest.raises(ToolError, match="exactly one"):
        await tool.invoke({"path": "a", "content_base64": encoded}, CONTEXT)


@pytest.mark.parametrize(
    "make_path",
    [
        pytest.param(lambda allowed, outside: str(outside / "secret.txt"), id="absolute-outside"),
        pytest.param(lambda allowed, outside: "../outside/secret.txt", id="dot-dot"),
        pytest.param(lambda allowed, outside: str(allowed / ".." / "outside" / "secret.txt"), id="absolute-dot-dot"),
        pytest.param(lambda allowed, outside: "/etc/passwd", id="system-file"),
    ],
)
async def test_read_document_refuses_paths_outside_the_allowed_dirs(
    pool: CpuPool, dirs: tuple[Path, Path], make_path: Callable[[Path, Path], str]
) -> None:
    allowed, outside = dirs
    tool = ReadDocumentTool(pool, [allowed])
    with pytest.raises(ToolError, match="outside the directories") as refused:
        await tool.invoke({"path": make_path(allowed, outside)}, CONTEXT)
    assert "TOP SECRET" not in str(refused.value)


async def test_read_document_refuses_symlinks_that_escape(pool: CpuPool, dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    (allowed / "link.txt").symlink_to(outside / "secret.txt")
    (allowed / "linkdir").symlink_to(outside, target_is_directory=True)
    (allowed / "inside.md").symlink_to(allowed / "notes.md")  # a symlink that stays inside is fine
    tool = ReadDocumentTool(pool, [allowed])
    for escaping in ("link.txt", str(allowed / "linkdir" / "secret.txt")):
        with pytest.raises(ToolError, match="outside the directories"):
            await tool.invoke({"path": escaping}, CONTEXT)
    result = await tool.invoke({"path": "inside.md"}, CONTEXT)
    assert "first point" in result.content


async def test_read_document_reports_missing_files_and_directories(pool: CpuPool, dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    tool = ReadDocumentTool(pool, [allowed])
    with pytest.raises(ToolError, match="no such file"):
        await tool.invoke({"path": "missing.txt"}, CONTEXT)
    with pytest.raises(ToolError, match="not a regular file"):
        await tool.invoke({"path": "sub"}, CONTEXT)


# --- token counting --------------------------------------------------------------------------------


class SpyPool(CpuPool):
    """Records what is sent to the workers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent: list[str] = []

    async def run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        self.sent.append(fn.__name__)
        return await super().run(fn, *args, timeout_s=timeout_s)


async def test_pooled_token_counter_counts_large_texts_in_the_pool_like_inline() -> None:
    approximate = ApproximateTokenCounter()
    async with SpyPool(max_workers=1) as spy:
        counter = PooledTokenCounter(spy, threshold_bytes=32_768)

        large = "héllo wörld — ünïcode 🙂 " * 20_000
        assert await counter.count(large) == count_tokens(large) == await approximate.count(large)
        assert spy.sent == ["count_tokens"]

        small = "a short prompt"
        assert await counter.count(small) == await approximate.count(small)
        assert spy.sent == ["count_tokens"]  # counted inline: no process hop

        # Characters say little about bytes: 10,000 emoji are 40,000 bytes, over the threshold.
        emoji, ascii_text = "🙂" * 10_000, "a" * 10_000
        assert await counter.count(emoji) == await approximate.count(emoji) == 10_000
        assert await counter.count(ascii_text) == 2_500
        assert spy.sent == ["count_tokens", "count_tokens"]


async def test_pooled_token_counter_still_counts_when_the_pool_cannot() -> None:
    stopped = CpuPool(max_workers=1)  # never started
    large = "x" * 100_000
    assert await PooledTokenCounter(stopped, threshold_bytes=1_000).count(large) == 25_000
