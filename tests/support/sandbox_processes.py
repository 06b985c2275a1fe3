"""What the host sees of python sandboxes: the processes in their pid namespaces, and their memory."""

from __future__ import annotations

import os


def own_pid_ns() -> str:
    return os.readlink("/proc/self/ns/pid")


def pid_ns_of_pid(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return own_pid_ns()


def processes_in(pid_ns: str) -> list[int]:
    """Host pids of every process (zombies included) still in the sandbox's pid namespace."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == pid_ns:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def sandboxed_descendants(root: int) -> list[int]:
    """Descendants of `root` in another pid namespace than ours: the processes inside its sandboxes."""
    mine = own_pid_ns()
    return [pid for pid in descendants(root) if pid_ns_of_pid(pid) != mine]


def proportional_memory(pids: list[int]) -> int:
    """Bytes of anonymous memory the processes use together (PSS: a page shared by n of them counts 1/n each).
    Anonymous only: the interpreter's file pages are shared with processes outside, and how much of them a
    sample counts moves with what else runs on the machine."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss_Anon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total
