"""Escapes from the `python` tool's sandbox that per-process limits and namespaces alone let through:
memory summed over many processes, new user namespaces (full capabilities inside), kernel interfaces
no program needs, and any number of calls at once from one model turn."""

from __future__ import annotations

import ast
import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pyseccomp
import pytest

from strata.agents.tools.base import ToolContext, ToolError, ToolResult
from strata.agents.tools.python_sandbox import PythonSandboxTool
from strata.config import PythonToolConfig
from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.sandbox_processes import proportional_memory, sandboxed_descendants
from tests.support.strata_process import StrataProcess

MB = 1024 * 1024
CONFIG = PythonToolConfig(timeout_s=15, cpu_s=10, memory_mb=128, max_processes=8, max_output_bytes=8000)

# Four processes of 80 MB each: every one under the 128 MB limit, 320 MB together.
MEMORY_HOG = """\
import os, time
children = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (80 * 1024 * 1024)
        print("held", i, flush=True)
        time.sleep(3)
        os._exit(0)
    children.append(pid)
print("statuses", [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children])
"""

# Runs a raw system call by number and prints "name: ok" or "name: ERRNO". The numbers come from
# libseccomp on the host, so the probe holds on any architecture.
SYSCALL_PROBE = """\
import ctypes, errno, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {numbers!r}

def call(label, name, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(arg) for arg in args])
    if result == 0 and name == "clone":
        os._exit(0)  # the child of a clone that should have failed
    print(label + ":", "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()], flush=True)

child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
word = ctypes.c_long(0)
iovec = (ctypes.c_void_p * 2)(ctypes.addressof(word), ctypes.sizeof(word))
call("ptrace attach", "ptrace", 16, child, 0, 0)
call("process_vm_readv", "process_vm_readv", child, ctypes.addressof(iovec), 1, ctypes.addressof(iovec), 1, 0)
call("bpf", "bpf", 5, 0, 0)
call("keyctl", "keyctl", 0, -3, 0)
call("userfaultfd", "userfaultfd", 1)
call("io_uring_setup", "io_uring_setup", 1, 0)
call("perf_event_open", "perf_event_open", 0, 0, -1, -1, 0)
call("personality no-aslr", "personality", 0x0040000)
call("personality query", "personality", 0xFFFFFFFF)
call("setns", "setns", os.open("/proc/self/ns/uts", os.O_RDONLY), 0)
call("clone3", "clone3", 0, 0)
call("clone newuser", "clone", 0x10000000 | 17, 0, 0, 0, 0)
call("unshare newuser", "unshare", 0x10000000 | 0x20000)
os.makedirs("/tmp/mnt", exist_ok=True)
ctypes.set_errno(0)
result = libc.mount(b"none", b"/tmp/mnt", b"tmpfs", 0, None)
print("mount:", "ok" if result == 0 else errno.errorcode[ctypes.get_errno()])
"""
SYSCALLS = [
    "ptrace", "process_vm_readv", "bpf", "keyctl", "userfaultfd", "io_uring_setup", "perf_event_open",
    "personality", "setns", "clone3", "clone", "unshare",
]  # fmt: skip

# Prints when it ran (the host and the sandbox share the clock) and whether it could leave for a new
# user namespace.
TIMED = """\
import ctypes, time
start = time.time()
denied = ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0
time.sleep(1)
print("span", start, time.time(), "unshare", "denied" if denied else "ALLOWED")
"""


def context(run_id: str) -> ToolContext:
    return ToolContext(run_id=run_id, idempotency_key=f"{run_id}:0:call", timeout_s=60)


async def run(code: str, **overrides: Any) -> ToolResult:
    tool = PythonSandboxTool(CONFIG.model_copy(update=overrides))
    return await tool.invoke({"code": code}, context("run-1"))


def statuses_in(output: str) -> list[int]:
    """The exit statuses of the memory hog's children, as it printed them."""
    line = next(line for line in output.splitlines() if line.startswith("statuses "))
    return ast.literal_eval(line.split(" ", 1)[1])


def lines(result: ToolResult, prefix: str) -> list[str]:
    return [line for line in result.content.splitlines() if line.startswith(prefix)]


def spans(outputs: list[str]) -> list[tuple[float, float]]:
    found = []
    for output in outputs:
        line = next(line for line in output.splitlines() if line.startswith("span "))
        _, start, end, *_ = line.split()
        found.append((float(start), float(end)))
    return found


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    current = peak = 0
    for _, change in edges:
        current += change
        peak = max(peak, current)
    return peak


async def test_processes_together_cannot_exceed_the_call_memory_limit() -> None:
    tool = PythonSandboxTool(CONFIG)
    call = asyncio.create_task(tool.invoke({"code": MEMORY_HOG}, context("run-1")))
    peak = 0
    while not call.done():  # what the host sees: the memory of every process in the sandbox
        peak = max(peak, proportional_memory(sandboxed_descendants(os.getpid())))
        await asyncio.sleep(0.05)
    result = call.result()
    if result.metadata.get("limits") == "rlimit":
        pytest.skip("no cgroup can be made here: see the next test for what bounds a call then")
    assert peak > 0, "the sandbox's processes were never seen"
    assert peak < 160 * MB, f"the call's processes held {peak / MB:.0f} MB together"  # never two blocks at once
    statuses = statuses_in(result.content)
    assert sum(status == 0 for status in statuses) <= 1, result.content
    assert -9 in statuses  # killed by the cgroup, not by a per-process limit
    assert result.metadata["limits"] in ("cgroup1", "cgroup2")
    assert result.metadata["oom_kills"] >= 3
    assert "killed: the call's processes and /tmp together exceeded its memory limit (128 MB)" in result.content
    if result.metadata["memory_peak_bytes"] is not None:
        assert result.metadata["memory_peak_bytes"] <= 128 * MB


async def test_without_a_cgroup_a_call_is_bounded_by_its_process_count() -> None:
    code = MEMORY_HOG.replace("range(4)", "range(6)").replace("80 * 1024", "60 * 1024")
    code = code.replace(
        "    pid = os.fork()\n", "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
    )
    result = await run(code, cgroup="off", max_processes=3)
    assert result.metadata["limits"] == "rlimit"
    # The program and two children: at most max_processes x memory_mb, as the README says.
    assert statuses_in(result.content) == [0, 0], result.content


async def test_no_new_user_namespace_and_no_dangerous_system_call() -> None:
    numbers = {name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) for name in SYSCALLS}
    code = SYSCALL_PROBE.format(numbers=numbers)
    code += "import subprocess\nprint('unshare -U:', subprocess.run(['unshare', '-U', 'true']).returncode)\n"
    code += (
        "print([line.strip() for line in open('/proc/self/status') if line.startswith(('Seccomp:', 'NoNewPrivs'))])\n"
    )
    result = await run(code)
    assert not result.is_error, result.content
    stdout = result.content.split("--- stdout ---\n", 1)[1].split("\n--- stderr ---", 1)[0]
    outcomes = dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)
    assert outcomes == {
        "ptrace attach": "EPERM",
        "process_vm_readv": "EPERM",
        "bpf": "EPERM",
        "keyctl": "EPERM",
        "userfaultfd": "EPERM",
        "io_uring_setup": "ENOSYS",
        "perf_event_open": "EPERM",
        "personality no-aslr": "EPERM",
        "personality query": "ok",
        "setns": "EPERM",
        "clone3": "ENOSYS",  # so that glibc falls back to clone, whose flags the filter sees
        "clone newuser": "EPERM",
        "unshare newuser": "EPERM",
        "mount": "EPERM",
        "unshare -U": "1",
    }, result.content
    assert "unshare failed: Operation not permitted" in result.content
    assert "['NoNewPrivs:\\t1', 'Seccomp:\\t2']" in result.content


async def test_ordinary_programs_still_work_under_the_filter() -> None:
    """Threads and posix_spawn go through clone3 first in glibc: its ENOSYS must send them to clone."""
    code = (
        "import concurrent.futures, os, subprocess, sys, threading\n"
        "squares = []\n"
        "threads = [threading.Thread(target=lambda i=i: squares.append(i * i)) for i in range(4)]\n"
        "[thread.start() for thread in threads]\n"
        "[thread.join() for thread in threads]\n"
        "with concurrent.futures.ThreadPoolExecutor(3) as pool:\n"
        "    print('pool', list(pool.map(abs, [-1, -2, -3])))\n"
        "print('threads', sorted(squares))\n"
        "print('child', subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout)\n"
        "spawned = os.posix_spawn(sys.executable, [sys.executable, '-c', 'pass'], {})\n"
        "print('posix_spawn', os.waitpid(spawned, 0)[1])\n"
        "forked = os.fork() or os._exit(7)\n"
        "print('fork', os.waitstatus_to_exitcode(os.waitpid(forked, 0)[1]))\n"
        "print('sum', sum(range(10**6)))\n"
    )
    result = await run(code)
    assert not result.is_error, result.content
    assert lines(result, "pool") == ["pool [1, 2, 3]"]
    assert lines(result, "threads") == ["threads [0, 1, 4, 9]"]
    assert lines(result, "child") == ["child 42"]
    assert lines(result, "posix_spawn") == ["posix_spawn 0"]
    assert lines(result, "fork") == ["fork 7"]
    assert lines(result, "sum") == ["sum 499999500000"]


async def test_parallel_calls_of_one_run_are_bounded_and_other_runs_are_not_held_back() -> None:
    tool = PythonSandboxTool(CONFIG.model_copy(update={"max_parallel": 2}))
    same_run = [tool.invoke({"code": TIMED}, context("run-1")) for _ in range(5)]
    results = await asyncio.gather(*same_run, tool.invoke({"code": TIMED}, context("run-2")))
    assert not any(result.is_error for result in results), [result.content for result in results]
    assert most_at_once(spans([result.content for result in results[:5]])) == 2
    assert sum(result.metadata["waited_s"] > 0.5 for result in results[:5]) == 3  # three waited for a slot
    assert results[5].metadata["waited_s"] < 0.1  # another run's call took a slot at once


async def test_all_runs_together_are_bounded() -> None:
    tool = PythonSandboxTool(CONFIG.model_copy(update={"max_parallel": 4, "max_parallel_total": 2}))
    calls = [tool.invoke({"code": TIMED}, context(f"run-{i % 3}")) for i in range(6)]
    results = await asyncio.gather(*calls)
    assert most_at_once(spans([result.content for result in results])) == 2


async def test_a_call_that_gets_no_slot_in_time_fails_with_the_reason_and_runs_nothing() -> None:
    tool = PythonSandboxTool(CONFIG.model_copy(update={"max_parallel": 1, "queue_timeout_s": 0.5}))
    first = asyncio.create_task(tool.invoke({"code": "import time\ntime.sleep(3)\nprint('first')"}, context("run-1")))
    await asyncio.sleep(0.2)
    with pytest.raises(ToolError) as refused:
        await tool.invoke({"code": "print('second')"}, context("run-1"))
    assert str(refused.value) == (
        "not run: this run already has 1 python calls running (tools.python.max_parallel) "
        "and none finished within 0.5s; call it again later"
    )
    assert "first" in (await first).content


# Through a real `strata serve`: one model turn asks for five python calls at once.


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    config = {
        "models": [mock_model(mock_backend)],
        "tools": {"python": {"timeout_s": 15, "memory_mb": 128, "max_processes": 8, "max_parallel": 2}},
        "agents": [{"name": "coder", "model": "mock-model", "system_prompt": "You code.", "tools": ["python"]}],
        "runs": {"lease_s": 5, "poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    process = StrataProcess(tmp_path_factory.mktemp("sandbox"), config, env={"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0


def run_agent(strata: StrataProcess, mock_backend: MockBackend, codes: list[str]) -> list[dict[str, Any]]:
    calls = [ToolCallSpec("python", {"code": code}, id=f"call_{i}") for i, code in enumerate(codes)]
    mock_backend.script(Reply(tool_calls=calls), Reply(content="done"))
    response = httpx.post(
        f"{strata.url}/v1/agents/coder/runs", json={"input": "compute"}, headers=strata.headers, timeout=90
    )
    assert response.status_code == 200, response.text
    run = response.json()
    assert (run["status"], run["output"]) == ("completed", "done"), json.dumps(run)[:3000]
    return [step for step in run["steps"] if step["kind"] == "tool"]


def test_an_agent_turn_runs_at_most_max_parallel_python_calls_at_once(
    strata: StrataProcess, mock_backend: MockBackend
) -> None:
    steps = run_agent(strata, mock_backend, [f"# call {i}\n{TIMED}" for i in range(5)])  # not a loop: they differ
    outputs = [step["output"]["content"] for step in steps]
    assert [step["status"] for step in steps] == ["completed"] * 5, outputs
    assert most_at_once(spans(outputs)) == 2
    assert all("unshare denied" in output for output in outputs)


def test_an_agent_python_call_cannot_sum_processes_past_the_memory_limit(
    strata: StrataProcess, mock_backend: MockBackend
) -> None:
    if '"limits": "rlimit"' in strata.logs():
        pytest.skip("no cgroup can be made here")
    [step] = run_agent(strata, mock_backend, [MEMORY_HOG])
    content = step["output"]["content"]
    assert "process(es) killed: the call's processes and /tmp together exceeded its memory limit (128 MB)" in content
    assert sum(status == 0 for status in statuses_in(content)) <= 1, content
