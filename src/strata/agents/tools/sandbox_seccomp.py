"""The seccomp filter of the python sandbox: system calls no sandboxed program needs and an escape would.

Built once with libseccomp (through `pyseccomp`, a ctypes wrapper around the libseccomp.so.2 that
Debian and Ubuntu install with apt) and handed to bwrap as BPF (`--seccomp FD`). Everything else is
allowed; the denied calls fail with an errno instead of killing, so code that probes for them (glibc,
libraries) degrades as on a host that lacks them. Only the native ABI is allowed: a 32-bit or x32
system call, which would bypass the filter's numbers, kills the process.
"""

from __future__ import annotations

import errno
import tempfile
from typing import Any

# Flags of clone() that make a namespace. CLONE_NEWTIME is left out: in clone() that bit is part of
# the exit signal, and a time namespace can only be made with unshare() or clone3(), both denied.
CLONE_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
# ENOSYS: glibc (pthread_create, posix_spawn) falls back from clone3 to clone, whose flags we can see;
# io_uring users fall back to plain reads and writes.
NOT_IMPLEMENTED = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")
DENIED = (
    # namespaces and mounts
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # the kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf", "perf_event_open",
    "keyctl", "add_key", "request_key", "userfaultfd", "reboot", "swapon", "swapoff", "syslog", "acct",
    "quotactl", "quotactl_fd", "lookup_dcookie", "vhangup", "uselib", "iopl", "ioperm", "settimeofday",
    "clock_settime", "clock_adjtime",
)  # fmt: skip


class SeccompUnavailable(RuntimeError):
    """libseccomp or its Python wrapper is missing: the sandbox must not run without its filter."""


def build_filter() -> bytes:
    """The filter as the BPF program bwrap reads from `--seccomp FD` (struct sock_filter[])."""
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError, OSError) as error:  # RuntimeError: libseccomp.so.2 not found
        raise SeccompUnavailable(
            f"libseccomp is not available ({error}); install the 'libseccomp2' package and 'pyseccomp'"
        ) from error
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    try:
        rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
        for name in NOT_IMPLEMENTED:
            rules.add_rule(seccomp.ERRNO(errno.ENOSYS), name)
        for name in DENIED:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        for flag in CLONE_NAMESPACE_FLAGS:  # the flags are clone()'s first argument on x86-64 and arm64
            rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        _deny_personality_changes(seccomp, rules)
        with tempfile.TemporaryFile() as program:
            rules.export_bpf(program)
            program.seek(0)
            return program.read()
    except OSError as error:  # a name this libseccomp does not know, or a failed export
        raise SeccompUnavailable(f"the seccomp filter could not be built with this libseccomp: {error}") from error


def _deny_personality_changes(seccomp: Any, rules: Any) -> None:
    """personality() only as PER_LINUX (0) or the query (0xffffffff): no ASLR off, no READ_IMPLIES_EXEC.

    A rule compares an argument once, so "neither 0 nor all ones" is written as "some bit is set and the
    next bit (cyclically) is clear", which holds for exactly those 32-bit values.
    """
    for bit in range(32):
        this, following = 1 << bit, 1 << ((bit + 1) % 32)
        rules.add_rule(
            seccomp.ERRNO(errno.EPERM), "personality", seccomp.Arg(0, seccomp.MASKED_EQ, this | following, this)
        )
