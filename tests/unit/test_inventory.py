"""GPU inventory, topology, rendering and metrics, driven by a fake NVML: this machine has no GPU.

The fake answers like pynvml does (same function names, same enum values, errors carrying an NVML
error code), so the code under test cannot tell it from a real 4-GPU box.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from strata.compute.gpu_render import render_inventory
from strata.compute.inventory import GpuInfo, GpuInventory, read_inventory, read_inventory_async
from strata.observability.gpu_metrics import GpuCollector, GpuMonitor

GIB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"
ERROR_TEXT = {
    pynvml.NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    pynvml.NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    pynvml.NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    pynvml.NVML_ERROR_UNKNOWN: "Unknown Error",
}


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return ERROR_TEXT[self.value]


@dataclass
class Handle:
    index: int


def bus_id(index: int, short_domain: bool = False) -> str:
    return f"{'0000' if short_domain else '00000000'}:{0x11 + index:02X}:00.0"


@dataclass
class FakeNvml:
    """A 4-GPU box: NV4 between GPUs 0-1, NV2 between 2-3, PCIe at a different level for every other pair.

    `fail` maps (function name, GPU index or None) to the NVML error code that call raises.
    """

    NVML_NVLINK_MAX_LINKS = 6
    NVMLError = FakeNVMLError

    count: int = 4
    # Per GPU, per link: the remote PCI bus id of an active link, None for an inactive one.
    nvlinks: dict[int, list[str | None]] = field(
        default_factory=lambda: {
            0: [bus_id(1), bus_id(1), bus_id(1, short_domain=True), bus_id(1), None, None],
            1: [bus_id(0)] * 4 + [None, None],
            2: [bus_id(3), bus_id(3), None, None, None, None],
            3: [bus_id(2, short_domain=True), bus_id(2), None, None, None, None],
        }
    )
    ancestors: dict[frozenset[int], int] = field(
        default_factory=lambda: {
            frozenset({0, 1}): pynvml.NVML_TOPOLOGY_SINGLE,
            frozenset({2, 3}): pynvml.NVML_TOPOLOGY_SINGLE,
            frozenset({0, 2}): pynvml.NVML_TOPOLOGY_MULTIPLE,
            frozenset({0, 3}): pynvml.NVML_TOPOLOGY_HOSTBRIDGE,
            frozenset({1, 2}): pynvml.NVML_TOPOLOGY_NODE,
            frozenset({1, 3}): pynvml.NVML_TOPOLOGY_SYSTEM,
        }
    )
    p2p_nvlink: set[frozenset[int]] = field(default_factory=set)
    failed_pairs: set[frozenset[int]] = field(default_factory=set)  # pairs whose common ancestor errors
    fail: dict[tuple[str, int | None], int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    init_thread: int | None = None

    def _call(self, name: str, index: int | None = None) -> None:
        self.calls.append(name)
        code = self.fail.get((name, index))
        if code is not None:
            raise FakeNVMLError(code)

    def nvmlInit(self) -> None:
        self.init_thread = threading.get_ident()
        self._call("nvmlInit")

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call("nvmlSystemGetDriverVersion")
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._call("nvmlSystemGetCudaDriverVersion")
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        self._call("nvmlDeviceGetHandleByIndex", index)
        return Handle(index)

    def nvmlDeviceGetName(self, handle: Handle) -> str:
        self._call("nvmlDeviceGetName", handle.index)
        return H100

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        self._call("nvmlDeviceGetUUID", handle.index)
        return f"GPU-0000000{handle.index}-aaaa-bbbb-cccc-dddddddddddd"

    def nvmlDeviceGetMemoryInfo(self, handle: Handle) -> Any:
        self._call("nvmlDeviceGetMemoryInfo", handle.index)
        return SimpleNamespace(total=80 * GIB, used=handle.index * GIB, free=(80 - handle.index) * GIB)

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> Any:
        self._call("nvmlDeviceGetUtilizationRates", handle.index)
        return SimpleNamespace(gpu=10 * handle.index, memory=5)

    def nvmlDeviceGetTemperature(self, handle: Handle, sensor: int) -> int:
        self._call("nvmlDeviceGetTemperature", handle.index)
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return 40 + handle.index

    def nvmlDeviceGetPowerUsage(self, handle: Handle) -> int:
        self._call("nvmlDeviceGetPowerUsage", handle.index)
        return 100_000 + 1_500 * handle.index  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Handle) -> int:
        self._call("nvmlDeviceGetEnforcedPowerLimit", handle.index)
        return 700_000

    def nvmlDeviceGetPciInfo(self, handle: Handle) -> Any:
        self._call("nvmlDeviceGetPciInfo", handle.index)
        return SimpleNamespace(busId=bus_id(handle.index).encode(), domain=0, bus=0x11 + handle.index, device=0)

    def nvmlDeviceGetNvLinkState(self, handle: Handle, link: int) -> int:
        self._call("nvmlDeviceGetNvLinkState", handle.index)
        links = self.nvlinks.get(handle.index)
        if links is None:
            raise FakeNVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if link >= len(links):
            raise FakeNVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_NVLINK_STATE_ACTIVE if links[link] else pynvml.NVML_NVLINK_STATE_INACTIVE

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: Handle, link: int) -> Any:
        self._call("nvmlDeviceGetNvLinkRemotePciInfo", handle.index)
        remote = self.nvlinks[handle.index][link]
        if remote is None:
            raise FakeNVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return SimpleNamespace(busId=remote.encode())

    def nvmlDeviceGetP2PStatus(self, a: Handle, b: Handle, index: int) -> int:
        self._call("nvmlDeviceGetP2PStatus", a.index)
        assert index == pynvml.NVML_P2P_CAPS_INDEX_NVLINK
        if frozenset({a.index, b.index}) in self.p2p_nvlink:
            return pynvml.NVML_P2P_STATUS_OK
        return pynvml.NVML_P2P_STATUS_NOT_SUPPORTED

    def nvmlDeviceGetTopologyCommonAncestor(self, a: Handle, b: Handle) -> int:
        self._call("nvmlDeviceGetTopologyCommonAncestor", a.index)
        key = frozenset({a.index, b.index})
        if key in self.failed_pairs:
            raise FakeNVMLError(pynvml.NVML_ERROR_UNKNOWN)
        return self.ancestors[key]


def pcie_kinds(inventory: GpuInventory) -> dict[tuple[int, int], str]:
    return {(link.a, link.b): link.kind for link in inventory.links if link.kind != "NVLINK"}


def topology_matrix(text: str) -> dict[str, list[str]]:
    """The matrix's body rows as printed: {"GPU0": ["X", "NV4", ...], ...}."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells[0].startswith("GPU") and "X" in cells:
            rows[cells[0]] = cells[1:]
    return rows


def render_text(inventory: GpuInventory) -> str:
    console = Console(record=True, width=220, color_system=None)
    console.print(render_inventory(inventory))
    return console.export_text()


# --- reading the inventory ---------------------------------------------------------------------


def test_reads_every_gpu_and_the_versions() -> None:
    nvml = FakeNvml()
    inventory = read_inventory(nvml)

    assert inventory.available and inventory.reason is None and inventory.errors == []
    assert (inventory.driver_version, inventory.cuda_version) == ("550.54.15", "12.4")
    assert [gpu.index for gpu in inventory.gpus] == [0, 1, 2, 3]
    assert inventory.gpus[3] == GpuInfo(
        index=3,
        uuid="GPU-00000003-aaaa-bbbb-cccc-dddddddddddd",
        name=H100,
        memory_total_bytes=80 * GIB,
        memory_used_bytes=3 * GIB,
        utilization_gpu_pct=30,
        temperature_c=43,
        power_w=104.5,
        power_limit_w=700.0,
    )
    assert nvml.calls[0] == "nvmlInit" and nvml.calls[-1] == "nvmlShutdown"


def test_nvlink_pairs_are_found_by_the_remote_bus_id() -> None:
    inventory = read_inventory(FakeNvml())

    assert inventory.nvlink_pairs() == {frozenset({0, 1}), frozenset({2, 3})}
    assert (inventory.link(1, 0).kind, inventory.link(1, 0).nvlink_count) == ("NVLINK", 4)
    assert (inventory.link(2, 3).kind, inventory.link(2, 3).nvlink_count) == ("NVLINK", 2)


def test_other_pairs_get_their_pcie_level() -> None:
    inventory = read_inventory(FakeNvml())

    assert len(inventory.links) == 6
    assert pcie_kinds(inventory) == {(0, 2): "PXB", (0, 3): "PHB", (1, 2): "NODE", (1, 3): "SYS"}
    assert all(link.nvlink_count == 0 for link in inventory.links if link.kind != "NVLINK")


def test_a_link_seen_from_one_end_only_still_counts() -> None:
    nvml = FakeNvml()
    nvml.nvlinks = {1: nvml.nvlinks[1], 3: nvml.nvlinks[3]}  # GPUs 0 and 2 report no NVLink at all

    assert read_inventory(nvml).nvlink_pairs() == {frozenset({0, 1}), frozenset({2, 3})}


def test_nvswitch_box_is_all_nvlink_through_p2p_status() -> None:
    switch = "00000000:C0:00.0"  # every link ends at an NVSwitch, not at a GPU
    nvml = FakeNvml(
        nvlinks={index: [switch] * 6 for index in range(4)},
        p2p_nvlink={frozenset({a, b}) for a in range(4) for b in range(a + 1, 4)},
    )
    inventory = read_inventory(nvml)

    assert inventory.nvlink_pairs() == {frozenset({a, b}) for a in range(4) for b in range(a + 1, 4)}
    assert {link.nvlink_count for link in inventory.links} == {6}
    assert "nvmlDeviceGetTopologyCommonAncestor" not in nvml.calls


def test_pcie_only_box_falls_back_to_common_ancestor() -> None:
    inventory = read_inventory(FakeNvml(nvlinks={}))

    assert inventory.nvlink_pairs() == set()
    assert pcie_kinds(inventory) == {
        (0, 1): "PIX",
        (2, 3): "PIX",
        (0, 2): "PXB",
        (0, 3): "PHB",
        (1, 2): "NODE",
        (1, 3): "SYS",
    }


def test_topology_can_be_skipped_for_metric_refreshes() -> None:
    nvml = FakeNvml()
    inventory = read_inventory(nvml, topology=False)

    assert inventory.available and len(inventory.gpus) == 4 and inventory.links == []
    assert not any("NvLink" in call or "Topology" in call or "P2P" in call for call in nvml.calls)


def test_to_dict_is_json_ready() -> None:
    payload = json.loads(json.dumps(read_inventory(FakeNvml()).to_dict()))

    assert payload["available"] is True
    assert payload["gpus"][1]["memory_used_bytes"] == GIB
    assert {"a": 0, "b": 1, "kind": "NVLINK", "nvlink_count": 4} in payload["links"]


# --- failures ----------------------------------------------------------------------------------


def test_init_failure_is_an_answer_not_an_exception() -> None:
    nvml = FakeNvml(fail={("nvmlInit", None): pynvml.NVML_ERROR_DRIVER_NOT_LOADED})
    inventory = read_inventory(nvml)

    assert not inventory.available and inventory.gpus == [] and inventory.links == []
    assert inventory.reason == "NVML could not be initialised: Driver Not Loaded (no NVIDIA driver or GPU)"
    assert "nvmlShutdown" not in nvml.calls


def test_device_count_failure_is_unavailable_and_still_shuts_down() -> None:
    nvml = FakeNvml(fail={("nvmlDeviceGetCount", None): pynvml.NVML_ERROR_UNKNOWN})
    inventory = read_inventory(nvml)

    assert not inventory.available
    assert inventory.reason == "NVML query failed: Unknown Error"
    assert nvml.calls[-1] == "nvmlShutdown"


def test_no_devices_is_unavailable() -> None:
    inventory = read_inventory(FakeNvml(count=0))

    assert not inventory.available and inventory.reason == "NVML reports no GPUs"
    assert inventory.driver_version == "550.54.15"


def test_a_gpu_lost_midway_gives_a_partial_inventory() -> None:
    nvml = FakeNvml(fail={("nvmlDeviceGetMemoryInfo", 2): pynvml.NVML_ERROR_GPU_IS_LOST})
    inventory = read_inventory(nvml)

    assert inventory.available
    assert [gpu.index for gpu in inventory.gpus] == [0, 1, 3]
    assert inventory.errors == ["GPU 2 skipped: GPU is lost"]
    assert inventory.nvlink_pairs() == {frozenset({0, 1})}
    assert {(link.a, link.b) for link in inventory.links} == {(0, 1), (0, 3), (1, 3)}
    assert nvml.calls[-1] == "nvmlShutdown"


def test_every_gpu_failing_is_unavailable_with_the_reasons() -> None:
    nvml = FakeNvml(fail={("nvmlDeviceGetHandleByIndex", i): pynvml.NVML_ERROR_GPU_IS_LOST for i in range(4)})
    inventory = read_inventory(nvml)

    assert not inventory.available
    assert inventory.reason is not None and inventory.reason.startswith("all 4 GPUs failed to read: GPU 0 skipped")


def test_unsupported_metrics_are_none_and_real_errors_are_reported() -> None:
    nvml = FakeNvml(
        fail={
            ("nvmlDeviceGetTemperature", 1): pynvml.NVML_ERROR_NOT_SUPPORTED,
            ("nvmlDeviceGetPowerUsage", 3): pynvml.NVML_ERROR_UNKNOWN,
        }
    )
    inventory = read_inventory(nvml)

    assert len(inventory.gpus) == 4
    assert inventory.gpus[1].temperature_c is None and inventory.gpus[1].power_w is not None
    assert inventory.gpus[3].power_w is None and inventory.gpus[3].power_limit_w == 700.0
    assert inventory.errors == ["GPU 3 power: Unknown Error"]


def test_one_pair_without_topology_is_left_out_and_reported() -> None:
    nvml = FakeNvml(failed_pairs={frozenset({1, 3})})
    inventory = read_inventory(nvml)

    assert inventory.available and inventory.link(1, 3) is None
    assert inventory.errors == ["GPU 1-3 topology: Unknown Error"]
    assert len(inventory.links) == 5


def test_real_pynvml_on_this_machine_answers_without_raising() -> None:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        has_driver = False
    else:
        has_driver = True

    inventory = read_inventory()  # the real pynvml module

    if has_driver:
        assert inventory.available or inventory.reason
    else:
        assert not inventory.available and inventory.gpus == []
        assert inventory.reason is not None and inventory.reason.startswith("NVML could not be initialised: ")
        assert "no NVIDIA driver or GPU" in inventory.reason


def test_missing_binding_is_unavailable() -> None:
    inventory = read_inventory(None)

    assert not inventory.available and inventory.reason is not None and "nvidia-ml-py" in inventory.reason


async def test_async_read_runs_off_the_event_loop_thread() -> None:
    nvml = FakeNvml()
    inventory = await read_inventory_async(nvml)

    assert inventory.nvlink_pairs() == {frozenset({0, 1}), frozenset({2, 3})}
    assert nvml.init_thread is not None and nvml.init_thread != threading.get_ident()


# --- rendering ---------------------------------------------------------------------------------


def test_render_shows_gpus_and_an_nvidia_smi_style_matrix() -> None:
    text = render_text(read_inventory(FakeNvml()))

    assert H100 in text and "Driver 550.54.15" in text and "CUDA 12.4" in text
    assert "3.0 / 80.0 GiB" in text and "30 %" in text and "43 °C" in text and "104 / 700 W" in text
    assert topology_matrix(text) == {
        "GPU0": ["X", "NV4", "PXB", "PHB"],
        "GPU1": ["NV4", "X", "NODE", "SYS"],
        "GPU2": ["PXB", "NODE", "X", "NV2"],
        "GPU3": ["PHB", "SYS", "NV2", "X"],
    }


def test_render_marks_unknown_pairs_and_lists_errors() -> None:
    text = render_text(read_inventory(FakeNvml(failed_pairs={frozenset({1, 3})})))

    assert topology_matrix(text)["GPU1"] == ["NV4", "X", "NODE", "?"]
    assert "Partial inventory" in text and "GPU 1-3 topology: Unknown Error" in text


def test_render_without_gpus_is_one_plain_line() -> None:
    inventory = read_inventory(FakeNvml(fail={("nvmlInit", None): pynvml.NVML_ERROR_DRIVER_NOT_LOADED}))

    assert render_text(inventory).strip() == (
        "No NVIDIA GPUs found: NVML could not be initialised: Driver Not Loaded (no NVIDIA driver or GPU)"
    )


# --- metrics -----------------------------------------------------------------------------------


def test_collector_emits_gauges_per_gpu() -> None:
    inventory = read_inventory(FakeNvml(fail={("nvmlDeviceGetTemperature", 1): pynvml.NVML_ERROR_NOT_SUPPORTED}))
    registry = CollectorRegistry()
    registry.register(GpuCollector(lambda: inventory))

    def value(name: str, gpu: int) -> float | None:
        return registry.get_sample_value(name, {"gpu": str(gpu), "name": H100})

    assert value("strata_gpu_memory_used_bytes", 2) == 2 * GIB
    assert value("strata_gpu_memory_total_bytes", 0) == 80 * GIB
    assert value("strata_gpu_utilization_ratio", 3) == pytest.approx(0.3)
    assert value("strata_gpu_temperature_celsius", 2) == 42
    assert value("strata_gpu_temperature_celsius", 1) is None  # unsupported: no sample rather than a fake 0
    assert value("strata_gpu_power_watts", 1) == 101.5
    exposition = generate_latest(registry).decode()
    assert exposition.count("strata_gpu_memory_used_bytes{") == 4


def test_collector_emits_nothing_without_gpus_and_does_not_read_on_register() -> None:
    reads = 0

    def read() -> GpuInventory:
        nonlocal reads
        reads += 1
        return GpuInventory.unavailable("NVML could not be initialised: Driver Not Loaded")

    registry = CollectorRegistry(auto_describe=True)
    registry.register(GpuCollector(read))
    assert reads == 0

    assert "strata_gpu" not in generate_latest(registry).decode()
    assert reads == 1


async def test_monitor_caches_the_latest_inventory_for_the_collector() -> None:
    box = read_inventory(FakeNvml())
    answers = [GpuInventory.unavailable("not yet"), box, box]
    reads = 0
    third_read = asyncio.Event()

    async def read() -> GpuInventory:
        nonlocal reads
        reads += 1
        if reads == 2:
            raise RuntimeError("a bug in one refresh")
        if reads >= 3:
            third_read.set()
        return answers[min(reads - 1, 2)]

    monitor = GpuMonitor(read)
    registry = CollectorRegistry()
    registry.register(GpuCollector(lambda: monitor.latest))

    await monitor.start(interval_s=0)
    assert reads >= 1
    await asyncio.wait_for(third_read.wait(), timeout=5)
    await monitor.stop()

    assert monitor.latest is box
    assert registry.get_sample_value("strata_gpu_memory_used_bytes", {"gpu": "1", "name": H100}) == GIB
    stopped_at = reads
    for _ in range(5):
        await asyncio.sleep(0)
    assert reads == stopped_at
    await monitor.stop()  # idempotent


async def test_monitor_with_real_nvml_reports_no_gpus_here() -> None:
    monitor = GpuMonitor()
    await monitor.start(interval_s=3600)
    try:
        assert monitor.latest.reason != "GPU inventory not read yet"
        assert monitor.latest.links == []  # refreshes skip the topology
    finally:
        await monitor.stop()
