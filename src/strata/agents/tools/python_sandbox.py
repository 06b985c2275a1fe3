"""The `python` built-in: run model-written code in a bubblewrap sandbox, never on the host.

The sandbox has no network, no view of host processes, no environment secrets and a read-only
filesystem holding only /usr and the interpreter; /tmp is a small private tmpfs that vanishes with
the run. Limits (CPU, memory, processes, file size) are set inside the sandbox, after its
namespaces exist, so RLIMIT_NPROC counts only the sandbox's own processes.

RLIMIT_NPROC is ignored for processes whose real uid is host root, so the code must never run as
host root. When Strata itself is root, bwrap would map the sandbox user onto root and resolve bind
sources as an unprivileged user (which cannot reach an interpreter under /root). So we create a
fresh user namespace per run, with an identity uid map and nested namespaces disabled, let root
bwrap build the mounts, and have it switch into that namespace as uid 65534 (`--userns`): the code
then runs as host uid 65534, where the process limit is enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

from strata.agents.tools.base import Tool, ToolContext, ToolError, ToolResult, ToolRisk, ToolSpec
from strata.config import PythonToolConfig

SANDBOX_UID = 65534  # "nobody": owns nothing on the host
CODE_PATH = "/sandbox/main.py"  # what tracebacks show the model
MAX_CODE_BYTES = 1_000_000
# Our own wall-clock kill must win over the caller's timeout, so the model still gets the output.
KILL_GRACE_S = 5.0
_CHUNK = 64 * 1024
_MIB = 1024 * 1024
_CLONE_NEWUSER = 0x10000000
_MISSING_BWRAP = "the python tool is disabled: bubblewrap (bwrap) is not installed; install the 'bubblewrap' package"

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "A complete Python 3 program. Print what you need to see."},
    },
    "required": ["code"],
    "additionalProperties": False,
}

# Runs inside the sandbox: limits apply from here on, then the model's program replaces this process.
_BOOTSTRAP = """\
import os, resource, sys
cpu, memory, processes, file_size = map(int, sys.argv[1:5])
limits = [(resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
          (resource.RLIMIT_NPROC, processes, processes), (resource.RLIMIT_FSIZE, file_size, file_size)]
for kind, soft, hard in limits:
    ceiling = resource.getrlimit(kind)[1]
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), min(hard, ceiling)
    resource.setrlimit(kind, (soft, hard))
os.execv(sys.executable, [sys.executable, "-I", "-u", sys.argv[5]])
"""

# Holds a new user namespace while the parent maps it; forbids namespaces nested inside it.
_NAMESPACE_HOLDER = f"""\
import ctypes, sys
if ctypes.CDLL(None, use_errno=True).unshare({_CLONE_NEWUSER}) != 0:
    sys.exit("unshare(CLONE_NEWUSER) failed: " + __import__("os").strerror(ctypes.get_errno()))
print("unshared", flush=True)
sys.stdin.readline()
with open("/proc/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
print("sealed", flush=True)
sys.stdin.read()
"""


@dataclass(frozen=True)
class _Outcome:
    exit_code: int | None
    stopped_for: str | None  # "timeout" or "output" when we killed it
    stdout: bytes
    stderr: bytes
    truncated: bool
    duration_s: float


class _Capture:
    """Collects stdout and stderr under one shared byte budget; `full` is set once it overflows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.truncated = False
        self.full = asyncio.Event()
        self.stdout = bytearray()
        self.stderr = bytearray()

    async def drain(self, stream: asyncio.StreamReader, sink: bytearray) -> None:
        while chunk := await stream.read(_CHUNK):
            room = self.limit - self.used
            sink += chunk[:room]
            self.used += min(room, len(chunk))
            if len(chunk) > room:
                self.truncated = True
                self.full.set()
                return


class PythonSandboxTool(Tool):
    """Runs one Python program per call inside bwrap. Disabled (never unsandboxed) without bwrap."""

    def __init__(self, config: PythonToolConfig, bwrap_path: str | None | EllipsisType = ...) -> None:
        """`bwrap_path`: `...` looks bwrap up on PATH; None means it is not installed."""
        self._config = config
        self._bwrap = shutil.which("bwrap") if bwrap_path is ... else bwrap_path
        self._interpreter = os.path.realpath(sys.executable)
        self._running: set[asyncio.subprocess.Process] = set()
        self.unavailable_reason = self._check_available()
        self.spec = ToolSpec(
            name="python",
            description=(
                "Run a Python 3 program in an isolated sandbox and get its stdout, stderr and exit status. "
                "Only the standard library; no network; only /tmp is writable and it is emptied after every call. "
                f"Limits: {config.timeout_s:g}s wall clock, {config.cpu_s}s CPU, {config.memory_mb} MB memory, "
                f"{config.max_output_bytes} bytes of output. Print the results you need."
            ),
            parameters=PARAMETERS,
            timeout_s=config.timeout_s + KILL_GRACE_S,
            risk=ToolRisk.MEDIUM,
        )

    def _check_available(self) -> str | None:
        if not self._config.enabled:
            return "the python tool is disabled in the configuration (tools.python.enabled)"
        if sys.platform != "linux":
            return "the python tool is disabled: its bubblewrap sandbox needs Linux"
        if not self._bwrap or not os.access(self._bwrap, os.X_OK):
            return _MISSING_BWRAP
        return None

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        if self.unavailable_reason:
            raise ToolError(self.unavailable_reason)
        code = arguments.get("code")
        if not isinstance(code, str):
            raise ToolError("'code' must be a string holding a Python program")
        source = code.encode("utf-8", errors="surrogatepass")
        if len(source) > MAX_CODE_BYTES:
            raise ToolError(f"the program is too long ({len(source)} bytes; at most {MAX_CODE_BYTES})")
        wall_s = min(self._config.timeout_s, context.timeout_s) if context.timeout_s > 0 else self._config.timeout_s
        outcome = await self._run(source, wall_s)
        return self._result(outcome, wall_s)

    async def close(self) -> None:
        for process in list(self._running):
            _kill_group(process)

    async def _run(self, source: bytes, wall_s: float) -> _Outcome:
        code_fd = os.memfd_create("strata-python-code")
        info_read, info_write = os.pipe()
        userns_fd: int | None = None
        try:
            os.write(code_fd, source)
            os.lseek(code_fd, 0, os.SEEK_SET)
            os.set_blocking(info_read, False)
            as_root = os.geteuid() == 0
            if as_root:
                userns_fd = await _private_user_namespace()
            argv = self._bwrap_argv(code_fd, info_write, userns_fd)
            pass_fds = (code_fd, info_write) if userns_fd is None else (code_fd, info_write, userns_fd)
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={},
                pass_fds=pass_fds,
                start_new_session=True,
                # Root bwrap builds the mounts; a gid other than root's sidesteps bwrap's setuid-before-setgid bug.
                **({"group": SANDBOX_UID, "extra_groups": []} if as_root else {}),
            )
        except BaseException:
            os.close(info_read)
            raise
        finally:
            for fd in (code_fd, info_write, userns_fd):
                if fd is not None:
                    os.close(fd)
        self._running.add(process)
        try:
            return await self._supervise(process, info_read, wall_s, started)
        finally:
            self._running.discard(process)
            if process.returncode is None:  # cancelled: kill at once, the caller is not waiting
                _kill_sandbox(process, info_read)
                _kill_group(process)
            os.close(info_read)

    async def _supervise(
        self, process: asyncio.subprocess.Process, info_read: int, wall_s: float, started: float
    ) -> _Outcome:
        assert process.stdout is not None and process.stderr is not None
        capture = _Capture(self._config.max_output_bytes)
        finished = asyncio.ensure_future(
            asyncio.gather(
                capture.drain(process.stdout, capture.stdout),
                capture.drain(process.stderr, capture.stderr),
                process.wait(),
            )
        )
        overflow = asyncio.ensure_future(capture.full.wait())
        stopped_for: str | None = None
        try:
            done, _ = await asyncio.wait({finished, overflow}, timeout=wall_s, return_when=asyncio.FIRST_COMPLETED)
            if finished not in done:
                stopped_for = "output" if overflow in done else "timeout"
                await _stop(process, info_read)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(finished), timeout=2.0)
        finally:
            overflow.cancel()
            if not finished.done():
                finished.cancel()
        return _Outcome(
            exit_code=process.returncode,
            stopped_for=stopped_for,
            stdout=bytes(capture.stdout),
            stderr=bytes(capture.stderr),
            truncated=capture.truncated,
            duration_s=time.monotonic() - started,
        )

    def _bwrap_argv(self, code_fd: int, info_fd: int, userns_fd: int | None) -> list[str]:
        assert self._bwrap is not None
        config = self._config
        bin_dir = os.path.dirname(self._interpreter)
        if userns_fd is None:
            identity = ["--unshare-user", "--disable-userns"]
        else:
            identity = ["--userns", str(userns_fd)]
        argv = [
            self._bwrap,
            *identity,
            *("--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)),
            *("--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"),
            *("--hostname", "sandbox", "--die-with-parent", "--new-session", "--info-fd", str(info_fd)),
            "--clearenv",
            *("--setenv", "PATH", f"{bin_dir}:/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8"),
            *("--setenv", "HOME", "/tmp"),
            *("--ro-bind", "/usr", "/usr"),
            *_system_links(),
            *(arg for root in _interpreter_roots(self._interpreter) for arg in ("--ro-bind", root, root)),
            *("--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"),
            *("--ro-bind-try", "/etc/localtime", "/etc/localtime"),
            *("--proc", "/proc", "--dev", "/dev"),
            *("--size", str(config.memory_mb * _MIB), "--perms", "1777", "--tmpfs", "/tmp"),
            *("--perms", "0444", "--ro-bind-data", str(code_fd), CODE_PATH),
            *("--chdir", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/"),
            "--",
            *(self._interpreter, "-I", "-S", "-c", _BOOTSTRAP),
            str(config.cpu_s),
            str(config.memory_mb * _MIB),
            # bwrap's reaper (pid 1) runs as the sandbox user too, and counts.
            str(config.max_processes + 1),
            str(config.memory_mb * _MIB),
            CODE_PATH,
        ]
        return argv

    def _result(self, outcome: _Outcome, wall_s: float) -> ToolResult:
        status, failed = self._status(outcome, wall_s)
        parts = [status]
        if outcome.stdout:
            parts += ["--- stdout ---", outcome.stdout.decode("utf-8", errors="replace").rstrip("\n")]
        if outcome.stderr:
            parts += ["--- stderr ---", outcome.stderr.decode("utf-8", errors="replace").rstrip("\n")]
        if not outcome.stdout and not outcome.stderr:
            parts.append("(no output)")
        if outcome.truncated:
            parts.append(f"[output truncated: more than {self._config.max_output_bytes} bytes]")
        metadata = {
            "exit_code": outcome.exit_code,
            "stopped_for": outcome.stopped_for,
            "truncated": outcome.truncated,
            "duration_s": round(outcome.duration_s, 3),
        }
        return ToolResult(content="\n".join(parts), is_error=failed, metadata=metadata)

    def _status(self, outcome: _Outcome, wall_s: float) -> tuple[str, bool]:
        config = self._config
        if outcome.stopped_for == "timeout":
            return f"timed out after {wall_s:g}s (killed)", True
        if outcome.stopped_for == "output":
            return f"killed: the output exceeded {config.max_output_bytes} bytes", True
        code = outcome.exit_code
        if code == 0:
            return "exit status 0", False
        if code == 1 and not outcome.stdout and outcome.stderr.startswith(b"bwrap: "):
            raise ToolError(f"the python sandbox failed to start: {outcome.stderr.decode(errors='replace').strip()}")
        if code is not None and code > 128 and (name := _signal_name(code - 128)):
            # bwrap reports a child killed by signal N as exit status 128 + N.
            reason = {
                "SIGXCPU": f"exceeded the CPU time limit ({config.cpu_s}s)",
                "SIGKILL": "a resource limit was exceeded",
                "SIGXFSZ": "exceeded the file size limit",
                "SIGSEGV": "crashed",
            }.get(name)
            return f"killed by {name}" + (f": {reason}" if reason else ""), True
        if _last_line(outcome.stderr).startswith(b"MemoryError"):
            return f"exit status {code}: exceeded the memory limit ({config.memory_mb} MB)", True
        return f"exit status {code}", True


async def _private_user_namespace() -> int:
    """A new user namespace (identity-mapped, nested ones forbidden) as an fd for `bwrap --userns`."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-S",
        "-c",
        _NAMESPACE_HOLDER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={},
    )
    assert holder.stdin is not None and holder.stdout is not None and holder.stderr is not None
    try:
        if await holder.stdout.readline() != b"unshared\n":
            error = (await holder.stderr.read()).decode(errors="replace").strip()
            raise ToolError(f"the python sandbox failed to start: no user namespace ({error})")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as mapping:
                mapping.write("0 0 4294967295\n")
        holder.stdin.write(b"mapped\n")
        await holder.stdin.drain()
        if await holder.stdout.readline() != b"sealed\n":
            raise ToolError("the python sandbox failed to start: could not seal its user namespace")
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()


async def _stop(process: asyncio.subprocess.Process, info_read: int) -> None:
    """Kill the sandbox's pid 1, which takes every process in it along, then let bwrap reap it."""
    _kill_sandbox(process, info_read)
    try:
        await asyncio.wait_for(process.wait(), timeout=2.0)
    except TimeoutError:
        _kill_group(process)
        await process.wait()


def _kill_sandbox(process: asyncio.subprocess.Process, info_read: int) -> None:
    try:
        child = int(json.loads(os.read(info_read, 4096))["child-pid"])
        pidfd = os.pidfd_open(child)
    except (OSError, ValueError, KeyError, TypeError):
        _kill_group(process)  # bwrap had not started the sandbox yet
        return
    try:
        # The pid is pinned by the pidfd; make sure it is still bwrap's child, not a reused pid.
        with open(f"/proc/{child}/stat", "rb") as stat:
            parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
        if parent == process.pid:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            _kill_group(process)
    except (OSError, ValueError, IndexError):
        _kill_group(process)
    finally:
        os.close(pidfd)


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _system_links() -> list[str]:
    """/bin, /lib... as on the host: symlinks into /usr on merged-/usr systems, else read-only binds."""
    args: list[str] = []
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _interpreter_roots(interpreter: str) -> list[str]:
    """The interpreter's install prefixes outside /usr (a pyenv or /opt Python), outermost only."""
    candidates = {
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sys.base_exec_prefix),
        os.path.dirname(os.path.dirname(interpreter)),
    }
    roots: list[str] = []
    for path in sorted(candidates):
        if path == "/" or path == "/usr" or path.startswith("/usr/"):
            continue
        if not any(path == root or path.startswith(root + "/") for root in roots):
            roots.append(path)
    return roots


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def _last_line(data: bytes) -> bytes:
    lines = data.strip().splitlines()
    return lines[-1] if lines else b""
