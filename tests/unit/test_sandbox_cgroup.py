"""Which cgroup directory the python sandbox makes its call groups under, on the layouts hosts have:
unified cgroup v2 (systemd), hybrid (memory on a v1 hierarchy), and containers whose cgroup mount
shows only their own subtree."""

from __future__ import annotations

from pathlib import Path

from strata.agents.tools.sandbox_cgroup import own_cgroup


def mount(mount_id: int, root: str, point: Path | str, filesystem: str, options: str) -> str:
    return f"{mount_id} 1 0:{mount_id} {root} {point} rw,relatime - {filesystem} {filesystem} {options}"


def cgroup_dir(base: Path, relative: str, controllers: str) -> Path:
    directory = base / relative
    directory.mkdir(parents=True)
    (directory / "cgroup.controllers").write_text(controllers + "\n")
    return directory


def test_unified_v2_under_systemd(tmp_path: Path) -> None:
    service = cgroup_dir(tmp_path, "system.slice/strata.service", "cpu io memory pids")
    mounts = mount(30, "/", tmp_path, "cgroup2", "rw,nsdelegate")
    assert own_cgroup(mounts, "0::/system.slice/strata.service\n", 2) == service
    assert own_cgroup(mounts, "0::/system.slice/strata.service\n", 1) is None  # no v1 memory hierarchy


def test_v2_without_the_memory_controller_is_not_used(tmp_path: Path) -> None:
    cgroup_dir(tmp_path, "system.slice/strata.service", "cpu pids")
    mounts = mount(30, "/", tmp_path, "cgroup2", "rw")
    assert own_cgroup(mounts, "0::/system.slice/strata.service\n", 2) is None


def test_hybrid_uses_the_v1_memory_hierarchy(tmp_path: Path) -> None:
    cgroup_dir(tmp_path / "unified", "", "hugetlb")
    mounts = "\n".join(
        [
            mount(32, "/", tmp_path / "cpu", "cgroup", "rw,cpu"),
            mount(35, "/", tmp_path / "memory", "cgroup", "rw,memory"),
            mount(41, "/", tmp_path / "unified", "cgroup2", "rw"),
        ]
    )
    memberships = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"
    assert own_cgroup(mounts, memberships, 2) is None  # the memory controller is not on v2
    assert own_cgroup(mounts, memberships, 1) == (tmp_path / "memory/process_api/abc").resolve()


def test_a_container_mount_that_shows_only_its_subtree(tmp_path: Path) -> None:
    inside = cgroup_dir(tmp_path, "app", "memory pids")
    mounts = mount(30, "/docker/abc", tmp_path, "cgroup2", "rw")
    assert own_cgroup(mounts, "0::/docker/abc/app\n", 2) == inside
    assert own_cgroup(mounts, "0::/elsewhere\n", 2) is None  # our group is outside what is mounted


def test_an_escaped_mount_point(tmp_path: Path) -> None:
    spaced = tmp_path / "cgroup fs"
    directory = cgroup_dir(spaced, "strata", "memory")
    mounts = mount(30, "/", str(spaced).replace(" ", "\\040"), "cgroup2", "rw")
    assert own_cgroup(mounts, "0::/strata\n", 2) == directory
