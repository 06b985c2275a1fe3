"""The `python` tool runs real code in a real bubblewrap sandbox: what the model gets back, and that
escapes (network, host files, secrets, processes, memory, CPU, output) stay inside."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from strata.agents.tools.base import ToolContext, ToolError, ToolResult, ToolRisk
from strata.agents.tools.python_sandbox import PythonSandboxTool
from strata.config import PythonToolConfig
from tests.support.sandbox_processes import descendants, own_pid_ns, pid_ns_of_pid, processes_in

PROJECT_DIR = Path(__file__).resolve().parents[2]
CONFIG = PythonToolConfig(timeout_s=3, cpu_s=1, memory_mb=128, max_processes=8, max_output_bytes=4000)
CONTEXT = ToolContext(run_id="run-1", idempotency_key="run-1:1:1", timeout_s=30)
MISSING = "the python tool is disabled: bubblewrap (bwrap) is not installed; install the 'bubblewrap' package"
# Prints the sandbox's pid namespace first (unbuffered), so a test can look for survivors on the host.
PRINT_PID_NS = "import os\nprint('pidns', os.readlink('/proc/self/ns/pid'))\n"


async def run(code: str, **overrides: float) -> ToolResult:
    tool = PythonSandboxTool(CONFIG.model_copy(update=overrides))
    return await tool.invoke({"code": code}, CONTEXT)


def pid_ns_of(result: ToolResult) -> str:
    line = next(line for line in result.content.splitlines() if line.startswith("pidns "))
    return line.split(" ", 1)[1]


def on_host(path: str) -> bool:
    return os.path.lexists(path)


def host_can_spawn() -> bool:
    return subprocess.run(["true"], timeout=5).returncode == 0


async def test_prints_a_computed_result() -> None:
    result = await run("import math\nprint(sum(i * i for i in range(10)), math.factorial(5))")
    assert not result.is_error
    assert result.content.splitlines()[0] == "exit status 0"
    assert "285 120" in result.content
    assert result.metadata["exit_code"] == 0


async def test_an_exception_is_an_error_with_its_traceback() -> None:
    result = await run("def f():\n    raise ValueError('bad input 42')\nf()")
    assert result.is_error
    assert result.content.startswith("exit status 1")
    assert "Traceback (most recent call last)" in result.content
    assert 'File "/sandbox/main.py", line 2, in f' in result.content
    assert "ValueError: bad input 42" in result.content


async def test_stdout_and_stderr_both_reach_the_model() -> None:
    result = await run("import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nsys.exit(3)")
    assert result.is_error
    assert result.content.startswith("exit status 3")
    assert "--- stdout ---\nto stdout" in result.content
    assert "--- stderr ---\nto stderr" in result.content


async def test_no_network_not_even_to_a_listener_on_host_loopback() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            f"for address in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
            "    try:\n"
            "        socket.create_connection(address, timeout=2).close()\n"
            "        print('CONNECTED', address)\n"
            "    except OSError as error:\n"
            "        print('blocked', address, error)\n"
        )
        result = await run(code)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's listener
    assert "CONNECTED" not in result.content
    assert result.content.count("blocked") == 3, result.content


async def test_writes_outside_tmp_fail_and_nothing_appears_on_the_host() -> None:
    token = f"strata-escape-{uuid.uuid4().hex}"
    targets = [f"/root/{token}", f"/etc/{token}", f"{PROJECT_DIR}/{token}", f"/usr/{token}", f"/{token}"]
    targets += [f"/dev/shm/{token}", f"/sandbox/{token}", f"{Path.home()}/{token}"]
    code = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('escaped')\n"
        "        print('WROTE', path)\n"
        "    except OSError as error:\n"
        "        print('denied', path, type(error).__name__)\n"
        # Opening for append changes nothing even if it succeeded, so a broken sandbox cannot harm the host.
        "for path in [os.__file__, '/usr/bin/env', '/sandbox/main.py']:\n"
        "    try:\n"
        "        open(path, 'ab').close()\n"
        "        print('WRITABLE', path)\n"
        "    except OSError as error:\n"
        "        print('read-only', path, type(error).__name__)\n"
    )
    result = await run(code)
    assert "WROTE" not in result.content and "WRITABLE" not in result.content, result.content
    assert result.content.count("denied") == len(targets) and result.content.count("read-only") == 3
    for target in targets:
        assert not on_host(target), f"{target} appeared on the host"


async def test_tmp_is_writable_private_and_gone_after_the_run() -> None:
    token = f"strata-tmp-{uuid.uuid4().hex}"
    first = await run(f"open('/tmp/{token}', 'w').write('kept?')\nimport os\nprint(os.getcwd(), os.listdir('.'))")
    assert not first.is_error
    assert f"/tmp ['{token}']" in first.content
    assert not on_host(f"/tmp/{token}")  # the host's /tmp never saw it
    second = await run(f"import os\nprint('exists' if os.path.exists('/tmp/{token}') else 'gone')")
    assert "gone" in second.content and "exists" not in second.content


async def test_environment_secrets_are_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {"STRATA_ADMIN_KEY": f"sk-admin-{uuid.uuid4().hex}", "OPENAI_API_KEY": f"sk-openai-{uuid.uuid4().hex}"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    code = (
        "import os\n"
        "print(sorted(os.environ))\n"
        # Every environment the sandbox can read: its own processes only, none of the host's.
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    for name in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            print(pid, name, open(f'/proc/{pid}/{name}', 'rb').read())\n"
        "        except OSError as error:\n"
        "            print(pid, name, type(error).__name__)\n"
    )
    result = await run(code)
    assert not result.is_error, result.content
    assert "['HOME', 'LANG', 'PATH', 'PWD']" in result.content
    for name, value in secrets.items():
        assert value not in result.content
        assert name not in result.content


async def test_runs_unprivileged_and_sees_no_host_process() -> None:
    code = (
        "import os, socket\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "print('uid', os.getuid(), 'caps', status['CapEff'].strip())\n"
        "print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "print('host', socket.gethostname())\n"
    )
    result = await run(code)
    uid_line, pids_line, host_line = result.content.splitlines()[2:5]
    assert uid_line.split()[1] != "0" and uid_line.endswith("caps 0000000000000000")
    assert pids_line == "pids [1, 2]"  # our supervisor and the program itself
    assert host_line == "host sandbox"


async def test_the_process_limit_really_bites() -> None:
    code = (
        "import os, time\n"
        "children = []\n"
        "for _ in range(50):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as error:\n"
        "        print('refused:', error)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(10)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "print('children', len(children))\n"
    )
    result = await run(code, max_processes=6)
    assert "refused: [Errno 11] Resource temporarily unavailable" in result.content, result.content
    assert "children 5" in result.content  # 6 processes: the program and 5 children
    assert result.content.startswith("exit status 0")  # nothing waited for the sleeping children


async def test_a_fork_bomb_is_contained_and_cleaned_up() -> None:
    bomb = PRINT_PID_NS + "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = await run(bomb, timeout_s=2, cpu_s=10)
    assert result.is_error
    # Stopped by the deadline, or sooner by the call's memory cap (a cgroup holds the whole bomb's memory); with
    # a cgroup a few hundred processes' stacks can reach the cap within the 2 s, depending on the machine's speed.
    stopped_by = ("timed out after 2s", "killed: the call's processes and /tmp together exceeded its memory limit")
    assert result.content.startswith(stopped_by), result.content
    assert processes_in(pid_ns_of(result)) == []
    assert host_can_spawn()


async def test_a_memory_hog_is_stopped() -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n"
    result = await run(hog, memory_mb=128)
    assert result.is_error
    assert result.content.startswith("exit status 1: exceeded the memory limit (128 MB)")
    assert "MemoryError" in result.content


async def test_a_huge_file_in_tmp_is_stopped() -> None:
    code = "with open('/tmp/big', 'wb') as f:\n    while True:\n        f.write(bytes(1024 * 1024))\n"
    result = await run(code, memory_mb=64)
    assert result.is_error
    assert "(64 MB)" in result.content.splitlines()[0]
    if result.metadata["oom_kills"]:  # a call's cgroup counts /tmp with its processes: it may be killed first
        assert result.content.startswith("killed: the call's processes and /tmp together exceeded its memory limit")
    else:
        assert "File too large" in result.content or "No space left on device" in result.content


async def test_an_infinite_loop_hits_the_cpu_limit() -> None:
    result = await run("while True:\n    pass\n", cpu_s=1, timeout_s=8)
    assert result.is_error
    assert result.content.startswith("killed: exceeded the CPU time limit (1s)")


async def test_a_sleeping_program_hits_the_wall_clock_timeout_and_keeps_its_output() -> None:
    code = PRINT_PID_NS + "import time\nfor _ in range(3):\n    os.fork() or time.sleep(60)\ntime.sleep(60)\n"
    result = await run(code, timeout_s=1.5)
    assert result.is_error
    assert result.content.startswith("timed out after 1.5s: killed")
    assert "pidns pid:[" in result.content  # what it printed before the kill still reaches the model
    assert processes_in(pid_ns_of(result)) == []


async def test_output_is_capped_with_a_marker() -> None:
    result = await run("while True:\n    print('x' * 100)\n", max_output_bytes=1000)
    assert result.is_error
    assert result.content.startswith("killed: the output exceeded 1000 bytes")
    assert result.content.endswith("[output truncated: more than 1000 bytes]")
    stdout = result.content.split("--- stdout ---\n", 1)[1].split("\n[output truncated", 1)[0]
    assert len(stdout) == 1000 and set(stdout) == {"x", "\n"}  # exactly the cap, newlines included
    assert result.metadata["truncated"] is True


async def test_cancelling_the_call_kills_every_process_in_the_sandbox() -> None:
    tool = PythonSandboxTool(CONFIG.model_copy(update={"timeout_s": 30}))
    code = "import os, time\nfor _ in range(3):\n    os.fork()\ntime.sleep(60)\n"
    task = asyncio.create_task(tool.invoke({"code": code}, CONTEXT))
    try:
        namespaces: set[str] = set()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if task.done():
                await task  # the tool's own error (no bwrap, say), not a vague "never started" below
            namespaces = {ns for ns in map(pid_ns_of_pid, descendants(os.getpid())) if ns != own_pid_ns()}
            if namespaces and len(processes_in(next(iter(namespaces)))) >= 9:
                break  # the supervisor and all eight processes are running
        assert namespaces, "the sandbox never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for namespace in namespaces:
            assert processes_in(namespace) == []
    finally:
        # Never leave a task whose exception nobody read: its finalizer would log a traceback from
        # inside whatever runs the next garbage collection (see tests/support/ast_guard.py).
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_without_bwrap_the_tool_refuses_with_a_clear_message(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for missing in (None, str(tmp_path / "no-such-bwrap")):
        tool = PythonSandboxTool(CONFIG, bwrap_path=missing)
        assert tool.unavailable_reason == MISSING
        with pytest.raises(ToolError) as caught:
            await tool.invoke({"code": f"open({str(marker)!r}, 'w')"}, CONTEXT)
        assert str(caught.value) == MISSING
    assert not marker.exists()  # never ran unsandboxed


async def test_spec_and_bad_arguments() -> None:
    tool = PythonSandboxTool(CONFIG, bwrap_path=shutil.which("bwrap"))
    assert (tool.spec.name, tool.spec.risk) == ("python", ToolRisk.MEDIUM)
    assert tool.spec.parameters["required"] == ["code"]
    assert tool.spec.timeout_s >= CONFIG.timeout_s
    assert tool.unavailable_reason is None
    with pytest.raises(ToolError, match="'code' must be a string"):
        await tool.invoke({"code": 42}, CONTEXT)
