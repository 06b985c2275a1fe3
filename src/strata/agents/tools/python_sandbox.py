"""The `python` built-in: run model-written code in a bubblewrap sandbox, never on the host.

The sandbox has no network, sees no host process, gets no environment secrets, and sees a
read-only filesystem holding only /usr and the interpreter; /tmp is a small private tmpfs that
vanishes with the run. Our own pid 1 inside it applies the limits to the program it starts, and
killing that pid 1 kills everything the program started.

The process limit (RLIMIT_NPROC) is the subtle one: the kernel ignores it for host root, and a
user namespace created by root bwrap maps the sandbox user onto host root. Unprivileged bwrap
cannot help either, since it resolves bind sources as that user (an interpreter under /root is out
of reach). So when Strata runs as root, root bwrap builds the mounts and keeps only CAP_SETUID and
CAP_SETGID, and the program drops to a fresh unprivileged host uid per run, which loses those too
(bwrap also sets no_new_privs and mounts everything nosuid). The per-run uid gives each run its own
process count. As any other user, bwrap runs unprivileged in a user namespace of its own.

Per-process limits do not bound a call that forks, so each call also gets a cgroup capping the
memory (and tasks) of all its processes together where the host allows one (sandbox_cgroup), a
seccomp filter denying namespaces, mounts, ptrace and other kernel attack surface
(sandbox_seccomp), and a slot among the calls that may run at once (sandbox_slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from types import EllipsisType
from typing import Any

import structlog

from strata.agents.tools.base import Tool, ToolContext, ToolError, ToolResult, ToolRisk, ToolSpec
from strata.agents.tools.sandbox_cgroup import CallGroup, Cgroups
from strata.agents.tools.sandbox_seccomp import SeccompUnavailable, build_filter
from strata.agents.tools.sandbox_slots import CallSlots, NoSlot
from strata.config import PythonToolConfig

log = structlog.get_logger("strata.tools")

CODE_PATH = "/sandbox/main.py"  # what tracebacks show the model
MAX_CODE_BYTES = 1_000_000
# Our own wall-clock kill must win over the caller's timeout, so the model still gets the output.
KILL_GRACE_S = 5.0
# Host uids for runs started by root: above the ranges distributions, systemd and subuid maps use.
SANDBOX_UID_BASE = 1_900_000_000
SANDBOX_UID_SPAN = 1 << 24
# Inside a user namespace of its own (Strata not root) the sandbox user is "nobody".
NAMESPACED_UID = 65534
MIN_BWRAP_VERSION = (0, 8)  # --disable-userns, --size
_CHUNK = 64 * 1024
_REAP_TIMEOUT_S = 2.0
_MIB = 1024 * 1024
_MISSING_BWRAP = "the python tool is disabled: bubblewrap (bwrap) is not installed; install the 'bubblewrap' package"
# The last stderr line of a failed program, and what it means in terms of our limits.
_LIMIT_HINTS = (
    (b"MemoryError", "exceeded the memory limit ({memory_mb} MB)"),
    (b"File too large", "exceeded the file size limit ({memory_mb} MB)"),
    (b"No space left on device", "/tmp is full ({memory_mb} MB)"),
    (b"Resource temporarily unavailable", "probably hit the process limit ({max_processes})"),
    (b"can't start new thread", "probably hit the process limit ({max_processes}, threads included)"),
)

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "A complete Python 3 program. Print what you need to see."},
    },
    "required": ["code"],
    "additionalProperties": False,
}

# The sandbox's pid 1 (bwrap --as-pid-1). It starts the model's program as pid 2 with the limits
# and uid applied, reaps orphans, and exits with the program's status, which ends every other
# process in the sandbox; bwrap reaps it, so no zombie is left on a host whose init does not reap.
# It keeps its own credentials, so bwrap's parent-death signal stays armed on it.
_BOOTSTRAP = """\
import os, resource, sys
uid, cpu, memory, processes, file_size = map(int, sys.argv[1:6])
program = os.fork()
if program == 0:
    try:
        if uid >= 0:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        for kind, soft, hard in [
            (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
            (resource.RLIMIT_NPROC, processes, processes), (resource.RLIMIT_FSIZE, file_size, file_size),
        ]:
            ceiling = resource.getrlimit(kind)[1]
            if ceiling != resource.RLIM_INFINITY:
                soft, hard = min(soft, ceiling), min(hard, ceiling)
            resource.setrlimit(kind, (soft, hard))
        os.execv(sys.executable, [sys.executable, "-I", "-u", sys.argv[6]])
    except BaseException as error:
        os.write(2, f"bwrap: the sandbox bootstrap failed: {error!r}\\n".encode())
    os._exit(1)
while True:
    pid, status = os.wait()
    if pid == program:
        code = os.waitstatus_to_exitcode(status)  # -N when killed by signal N: report it as 128 + N
        os._exit(128 - code if code < 0 else code)
"""


@dataclass(frozen=True)
class _Outcome:
    exit_code: int | None
    stopped_for: str | None  # "timeout" or "output" when we killed it
    stdout: bytes
    stderr: bytes
    truncated: bool
    duration_s: float
    oom_kills: int = 0  # processes the call's cgroup killed for memory
    memory_peak_bytes: int | None = None  # the call's cgroup's peak, where the kernel reports it


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


class _Sandbox:
    """A running bwrap (our child) and a pidfd on the sandbox's pid 1, learnt from `--info-fd`.

    Killing pid 1 kills every process in its pid namespace before pid 1 itself is gone, so waiting
    for pid 1 is how we know nothing the program started is still running.
    """

    def __init__(self, process: asyncio.subprocess.Process, info_read: int) -> None:
        self.process = process
        self._info_read = info_read
        self._pidfd: int | None = None
        self._attach = asyncio.ensure_future(self._find_pid1())

    async def _find_pid1(self) -> None:
        info = b""
        while True:  # bwrap may write its JSON in pieces
            await _readable(self._info_read)
            chunk = os.read(self._info_read, 4096)
            info += chunk
            try:
                child = int(json.loads(info)["child-pid"])
                break
            except (ValueError, KeyError, TypeError):
                if not chunk:
                    return  # bwrap failed before starting pid 1
        try:
            pidfd = os.pidfd_open(child)
        except OSError:
            return  # pid 1 is already gone, and everything in its namespace with it
        # The pidfd pins the process; its parent tells us it is ours and not a reused pid.
        if _parent_pid(child) == self.process.pid:
            self._pidfd = pidfd
        else:
            os.close(pidfd)

    def kill(self) -> None:
        """SIGKILL pid 1, which bwrap then reaps before exiting; bwrap itself while pid 1 is unknown."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        elif self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    async def destroy(self) -> None:
        """Kill everything in the sandbox and wait until bwrap has reaped it. Idempotent."""
        if not self._attach.done():
            # bwrap reports pid 1 within milliseconds of starting; give it a moment, not forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._attach), timeout=_REAP_TIMEOUT_S)
        self._attach.cancel()
        self.kill()
        try:
            await asyncio.wait_for(self.process.wait(), timeout=_REAP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._info_read >= 0:
            os.close(self._info_read)
            self._info_read = -1


class PythonSandboxTool(Tool):
    """Runs one Python program per call inside bwrap. Disabled (never unsandboxed) without bwrap."""

    def __init__(self, config: PythonToolConfig, bwrap_path: str | EllipsisType | None = ...) -> None:
        """`bwrap_path`: `...` (the default) looks bwrap up on PATH; None means it is not installed.

        Runs `bwrap --version` once, so build it at startup, not per request.
        """
        self._config = config
        self._bwrap = shutil.which("bwrap") if bwrap_path is ... else bwrap_path
        self._interpreter = os.path.realpath(sys.executable)
        self._running: set[_Sandbox] = set()
        self._uids_in_use: set[int] = set()
        self._slots = CallSlots(config.max_parallel, config.max_parallel_total)
        self._seccomp = b""
        self.cgroups = Cgroups("rlimit", reason="disabled in the configuration (tools.python.cgroup: off)")
        self.unavailable_reason: str | None = self._check_available()
        if self.unavailable_reason is None:
            log.info("python sandbox ready", limits=self.cgroups.mode, why_not_cgroup=self.cgroups.reason)
        memory = f"{config.memory_mb} MB memory " + ("in all" if self.cgroups.mode != "rlimit" else "per process")
        self.spec = ToolSpec(
            name="python",
            description=(
                "Run a Python 3 program in an isolated sandbox and get its stdout, stderr and exit status. "
                "No network; only /tmp is writable and it is emptied after every call. "
                f"Limits: {config.timeout_s:g}s wall clock, {config.cpu_s}s CPU, {memory}, "
                f"{config.max_processes} processes or threads, {config.max_output_bytes} bytes of output. "
                "Print the results you need."
            ),
            parameters=PARAMETERS,
            # A call may first wait for a slot; the caller's timeout must not end it while it waits.
            timeout_s=config.timeout_s + config.queue_timeout_s + KILL_GRACE_S,
            risk=ToolRisk.MEDIUM,
        )

    def _check_available(self) -> str | None:
        if not self._config.enabled:
            return "the python tool is disabled in the configuration (tools.python.enabled)"
        if sys.platform != "linux":
            return "the python tool is disabled: its bubblewrap sandbox needs Linux"
        if not self._bwrap or not os.access(self._bwrap, os.X_OK):
            return _MISSING_BWRAP
        version = _bwrap_version(self._bwrap)
        if version is None or version < MIN_BWRAP_VERSION:
            found = ".".join(map(str, version)) if version else "an unknown version"
            wanted = ".".join(map(str, MIN_BWRAP_VERSION))
            return f"the python tool is disabled: it needs bubblewrap {wanted} or newer, found {found}"
        try:
            self._seccomp = build_filter()
        except SeccompUnavailable as error:
            return f"the python tool is disabled: its seccomp filter needs libseccomp: {error}"
        if self._config.cgroup != "off":
            self.cgroups = Cgroups.detect()
            if self.cgroups.mode == "rlimit" and self._config.cgroup == "required":
                return (
                    "the python tool is disabled: tools.python.cgroup is 'required' and no cgroup can be made "
                    f"for its calls ({self.cgroups.reason})"
                )
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
        try:
            async with self._slots.hold(context.run_id, self._config.queue_timeout_s) as waited_s:
                wall_s = self._config.timeout_s
                if context.timeout_s > 0:
                    wall_s = min(wall_s, context.timeout_s - waited_s)
                uid = self._claim_uid() if os.geteuid() == 0 else None
                try:
                    outcome = await self._run(source, wall_s, uid)
                finally:
                    if uid is not None:
                        self._uids_in_use.discard(uid)
        except NoSlot as full:
            raise ToolError(self._busy(full)) from None
        return self._result(outcome, wall_s, waited_s)

    def _busy(self, full: NoSlot) -> str:
        config = self._config
        if full.bound == "run":
            bound = f"this run already has {config.max_parallel} python calls running (tools.python.max_parallel)"
        else:
            bound = f"{config.max_parallel_total} python calls already run here (tools.python.max_parallel_total)"
        return f"not run: {bound} and none finished within {config.queue_timeout_s:g}s; call it again later"

    async def close(self) -> None:
        for sandbox in list(self._running):
            sandbox.kill()

    def _claim_uid(self) -> int:
        while (uid := random.randrange(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_SPAN)) in self._uids_in_use:
            pass
        self._uids_in_use.add(uid)
        return uid

    async def _run(self, source: bytes, wall_s: float, uid: int | None) -> _Outcome:
        group = self._new_group()
        try:
            outcome = await self._start(source, wall_s, uid, group)
            if group is not None:
                outcome = replace(outcome, oom_kills=group.oom_kills(), memory_peak_bytes=group.peak_bytes())
            return outcome
        finally:
            if group is not None:
                await Cgroups.remove(group)

    def _new_group(self) -> CallGroup | None:
        if self.cgroups.mode == "rlimit":
            return None
        config = self._config
        try:  # the group also holds bwrap and the sandbox's pid 1
            return self.cgroups.create(config.memory_mb * _MIB, config.max_processes + 2)
        except OSError as error:
            raise ToolError(f"the python sandbox failed to start: cannot make its cgroup: {error}") from error

    async def _start(self, source: bytes, wall_s: float, uid: int | None, group: CallGroup | None) -> _Outcome:
        code_fd = os.memfd_create("strata-python-code")
        seccomp_fd = os.memfd_create("strata-python-seccomp")
        info_read, info_write = os.pipe()
        try:
            os.write(code_fd, source)
            os.lseek(code_fd, 0, os.SEEK_SET)
            os.write(seccomp_fd, self._seccomp)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            os.set_blocking(info_read, False)
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                *self.command(code_fd, info_write, uid, seccomp_fd),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={},
                pass_fds=(code_fd, info_write, seccomp_fd),
                start_new_session=True,
                preexec_fn=group.join if group is not None else None,  # born inside the call's cgroup
            )
        except (OSError, subprocess.SubprocessError) as error:
            os.close(info_read)
            raise ToolError(f"the python sandbox failed to start: {error}") from error
        except BaseException:
            os.close(info_read)
            raise
        finally:
            os.close(code_fd)
            os.close(seccomp_fd)
            os.close(info_write)
        sandbox = _Sandbox(process, info_read)
        self._running.add(sandbox)
        try:
            return await self._supervise(sandbox, wall_s, started)
        finally:
            # Also on success: background processes the program left behind die with it.
            self._running.discard(sandbox)
            await sandbox.destroy()

    async def _supervise(self, sandbox: _Sandbox, wall_s: float, started: float) -> _Outcome:
        process = sandbox.process
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
                await sandbox.destroy()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(finished), timeout=_REAP_TIMEOUT_S)
        finally:
            overflow.cancel()
            finished.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await finished  # retrieve it, so a cancelled gather is not reported as never retrieved
        return _Outcome(
            exit_code=process.returncode,
            stopped_for=stopped_for,
            stdout=bytes(capture.stdout),
            stderr=bytes(capture.stderr),
            truncated=capture.truncated,
            duration_s=time.monotonic() - started,
        )

    def command(self, code_fd: int, info_fd: int, uid: int | None, seccomp_fd: int) -> list[str]:
        """The bwrap command line. `uid`: the host uid to drop to when we are root, else None.

        Root bwrap makes no user namespace, so `--disable-userns` cannot apply there; the seccomp
        filter denies new namespaces in both cases.
        """
        assert self._bwrap is not None
        config = self._config
        if uid is None:  # unprivileged bwrap: a user namespace of its own, no nested ones
            user = str(NAMESPACED_UID)
            identity = ["--unshare-user", "--disable-userns", "--uid", user, "--gid", user]
        else:  # root bwrap: the bootstrap needs exactly these two capabilities to drop to `uid`
            identity = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        memory = str(config.memory_mb * _MIB)
        # The process limit counts our pid 1 when it runs as the sandbox user.
        processes = config.max_processes if uid is not None else config.max_processes + 1
        return [
            self._bwrap,
            *identity,
            *("--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"),
            *("--hostname", "sandbox", "--as-pid-1", "--die-with-parent", "--new-session", "--info-fd", str(info_fd)),
            *("--seccomp", str(seccomp_fd)),
            *("--clearenv", "--setenv", "PATH", f"{os.path.dirname(self._interpreter)}:/usr/bin:/bin"),
            *("--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", "/tmp"),
            *("--ro-bind", "/usr", "/usr"),
            *_system_links(),
            *_interpreter_binds(self._interpreter),
            *("--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"),
            *("--ro-bind-try", "/etc/localtime", "/etc/localtime"),
            *("--proc", "/proc", "--dev", "/dev"),
            *("--size", memory, "--perms", "1777", "--tmpfs", "/tmp"),
            *("--perms", "0444", "--ro-bind-data", str(code_fd), CODE_PATH),
            *("--chdir", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/"),
            *("--", self._interpreter, "-I", "-S", "-c", _BOOTSTRAP),
            *(str(-1 if uid is None else uid), str(config.cpu_s), memory, str(processes), memory, CODE_PATH),
        ]

    def _result(self, outcome: _Outcome, wall_s: float, waited_s: float) -> ToolResult:
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
        if outcome.oom_kills and self._memory_exceeded() not in status:
            parts.append(f"[{outcome.oom_kills} process(es) killed: {self._memory_exceeded()}]")
        metadata = {
            "exit_code": outcome.exit_code,
            "stopped_for": outcome.stopped_for,
            "truncated": outcome.truncated,
            "duration_s": round(outcome.duration_s, 3),
            "waited_s": round(waited_s, 3),
            "limits": self.cgroups.mode,  # cgroup2/cgroup1: memory capped for the whole call; rlimit: per process
            "oom_kills": outcome.oom_kills,
            "memory_peak_bytes": outcome.memory_peak_bytes,
        }
        return ToolResult(content="\n".join(parts), is_error=failed, metadata=metadata)

    def _status(self, outcome: _Outcome, wall_s: float) -> tuple[str, bool]:
        """The first line the model reads, and whether the call failed."""
        config = self._config
        if outcome.stopped_for == "timeout":
            return f"timed out after {wall_s:g}s: killed", True
        if outcome.stopped_for == "output":
            return f"killed: the output exceeded {config.max_output_bytes} bytes", True
        code = outcome.exit_code
        if code == 0:
            return "exit status 0", False
        if code == 1 and not outcome.stdout and outcome.stderr.startswith(b"bwrap: "):
            detail = outcome.stderr.decode(errors="replace").strip()
            raise ToolError(f"the python sandbox failed to start: {detail}")
        if code is not None and code > 128 and (name := _signal_name(code - 128)):
            # bwrap reports a program killed by signal N as exit status 128 + N.
            reason = {
                "SIGXCPU": f"exceeded the CPU time limit ({config.cpu_s}s)",
                "SIGKILL": self._memory_exceeded() if outcome.oom_kills else "a resource limit was exceeded",
                "SIGXFSZ": f"exceeded the file size limit ({config.memory_mb} MB)",
            }.get(name)
            return (f"killed: {reason} [{name}]" if reason else f"killed by {name}"), True
        last_line = _last_line(outcome.stderr)
        for marker, hint in _LIMIT_HINTS:
            if marker in last_line:
                return f"exit status {code}: " + hint.format(**config.model_dump()), True
        return f"exit status {code}", True

    def _memory_exceeded(self) -> str:
        return f"the call's processes and /tmp together exceeded its memory limit ({self._config.memory_mb} MB)"


async def _readable(fd: int) -> None:
    """Wait until `fd` is readable (a pipe with data or closed; a pidfd whose process has exited)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _system_links() -> list[str]:
    """/bin, /lib... as on the host: symlinks into /usr on merged-/usr systems, else read-only binds."""
    args: list[str] = []
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _interpreter_binds(interpreter: str) -> list[str]:
    """Read-only binds of the interpreter's install prefixes outside /usr (a pyenv or /opt Python).

    bwrap would give the missing parents of a bind the host's modes (/root is 0700), which the
    sandbox user could not traverse, so they are made 0755 first.
    """
    candidates = {
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sys.base_exec_prefix),
        os.path.dirname(os.path.dirname(interpreter)),
    }
    roots: list[str] = []
    for path in sorted(candidates):
        if path in ("/", "/usr") or path.startswith("/usr/"):
            continue
        if not any(path.startswith(root + "/") for root in roots) and path not in roots:
            roots.append(path)
    args: list[str] = []
    parents: set[str] = set()
    for root in roots:
        parent = os.path.dirname(root)
        chain: list[str] = []
        while parent != "/" and parent not in parents:
            chain.append(parent)
            parents.add(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(chain):
            args += ["--perms", "0755", "--dir", directory]
        args += ["--ro-bind", root, root]
    return args


def _bwrap_version(bwrap: str) -> tuple[int, ...] | None:
    try:
        output = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10, env={}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", output)
    return tuple(int(part) for part in match.groups(default="0")) if match else None


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def _last_line(data: bytes) -> bytes:
    lines = data.strip().splitlines()
    return lines[-1] if lines else b""
