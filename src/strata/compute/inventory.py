"""What GPUs this machine has, how busy they are, and how they are wired to each other (NVML).

NVML calls block (the first `nvmlInit` can take a second on a large box), so the event loop only
ever reaches this through `read_inventory_async`, which runs the read in a worker thread.
The NVML module is a parameter so tests drive the logic with a fake; a machine without a driver,
a GPU or even `nvidia-ml-py` gets `available=False` with the reason, never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

_INSTALLED: Any = object()  # `nvml=` default: the installed pynvml, imported on first read (see `_installed_nvml`)

LinkKind = Literal["NVLINK", "PIX", "PXB", "PHB", "NODE", "SYS"]

# Enum values from nvml.h: part of NVML's stable ABI, so a fake NVML need not define them.
_TEMPERATURE_GPU = 0
_NVLINK_STATE_ACTIVE = 1
_P2P_CAPS_INDEX_NVLINK = 2
_P2P_STATUS_OK = 0
_ERROR_NOT_SUPPORTED = 3
_DEFAULT_NVLINK_MAX_LINKS = 18  # older bindings lack the constant; newer ones raise it (36 today)

# nvmlDeviceGetTopologyCommonAncestor levels -> the names `nvidia-smi topo -m` prints.
# INTERNAL (two GPUs on one board) has no name of its own there; PIX is the nearest honest one.
_PCIE_LEVELS: dict[int, LinkKind] = {
    0: "PIX",  # NVML_TOPOLOGY_INTERNAL
    10: "PIX",  # NVML_TOPOLOGY_SINGLE: one PCIe switch
    20: "PXB",  # NVML_TOPOLOGY_MULTIPLE: several PCIe switches, no host bridge
    30: "PHB",  # NVML_TOPOLOGY_HOSTBRIDGE
    40: "NODE",  # NVML_TOPOLOGY_NODE: host bridges within one NUMA node
    50: "SYS",  # NVML_TOPOLOGY_SYSTEM: across the inter-socket link
}

_NO_DRIVER_HINT = "(no NVIDIA driver or GPU)"


@dataclass(frozen=True)
class GpuInfo:
    """One GPU. A metric the device does not report (e.g. power on some boards) is None."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_gpu_pct: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None


@dataclass(frozen=True)
class GpuLink:
    """How GPUs `a` < `b` reach each other: NVLink (with the number of links) or the PCIe path."""

    a: int
    b: int
    kind: LinkKind
    nvlink_count: int = 0


@dataclass(frozen=True)
class GpuInventory:
    """The answer to "which GPUs are here?".

    `available` is True when at least one GPU was read; otherwise `reason` says why not.
    `errors` lists queries that failed without stopping the read (a GPU skipped, a pair's
    topology unknown, a metric unreadable), so a partial answer says it is partial.
    """

    available: bool
    reason: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    links: list[GpuLink] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def unavailable(cls, reason: str, **versions: str | None) -> GpuInventory:
        return cls(available=False, reason=reason, **versions)

    def nvlink_pairs(self) -> set[frozenset[int]]:
        return {frozenset((link.a, link.b)) for link in self.links if link.kind == "NVLINK"}

    def link(self, a: int, b: int) -> GpuLink | None:
        lo, hi = min(a, b), max(a, b)
        return next((link for link in self.links if link.a == lo and link.b == hi), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the shape `GET /admin/gpus` returns."""
        return asdict(self)


def _installed_nvml() -> Any:
    """pynvml, or None. Imported on first use: it costs `strata serve` ~0.1 s of start-up otherwise."""
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is a dependency, but a broken install must not break `strata gpus`
        return None
    return pynvml


def read_inventory(nvml: Any = _INSTALLED, *, topology: bool = True) -> GpuInventory:
    """Read every GPU (and, with `topology`, every pair's link) in one NVML session.

    Blocking: call it from a worker thread (`read_inventory_async`). `topology=False` skips the
    pairwise queries, which never change while the machine runs, for periodic metric refreshes.
    """
    if nvml is _INSTALLED:
        nvml = _installed_nvml()
    if nvml is None:
        return GpuInventory.unavailable("nvidia-ml-py (pynvml) is not installed")
    nvml_error: type[BaseException] = getattr(nvml, "NVMLError", OSError)
    failures = (nvml_error, OSError)
    try:
        nvml.nvmlInit()
    except failures as exc:
        return GpuInventory.unavailable(f"NVML could not be initialised: {_describe(exc)} {_NO_DRIVER_HINT}")
    try:
        return _read(nvml, nvml_error, topology)
    except failures as exc:  # a system-wide query failed: nothing trustworthy to report
        return GpuInventory.unavailable(f"NVML query failed: {_describe(exc)}")
    finally:
        with contextlib.suppress(*failures):
            nvml.nvmlShutdown()


async def read_inventory_async(nvml: Any = _INSTALLED, *, topology: bool = True) -> GpuInventory:
    """`read_inventory` off the event loop."""
    return await asyncio.to_thread(read_inventory, nvml, topology=topology)


def _read(nvml: Any, nvml_error: type[BaseException], topology: bool) -> GpuInventory:
    errors: list[str] = []
    driver = _optional(lambda: _text(nvml.nvmlSystemGetDriverVersion()), nvml_error, errors, "driver version")
    cuda_raw = _optional(nvml.nvmlSystemGetCudaDriverVersion, nvml_error, errors, "CUDA version")
    cuda = f"{cuda_raw // 1000}.{cuda_raw % 1000 // 10}" if isinstance(cuda_raw, int) else None
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        return GpuInventory.unavailable("NVML reports no GPUs", driver_version=driver, cuda_version=cuda)

    handles: dict[int, Any] = {}
    gpus: list[GpuInfo] = []
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(_read_gpu(nvml, nvml_error, index, handle, errors))
            handles[index] = handle
        except nvml_error as exc:
            errors.append(f"GPU {index} skipped: {_describe(exc)}")
    if not gpus:
        reason = f"all {count} GPUs failed to read: " + "; ".join(errors)
        return GpuInventory.unavailable(reason, driver_version=driver, cuda_version=cuda)

    links = _read_links(nvml, nvml_error, handles, errors) if topology else []
    return GpuInventory(
        available=True,
        driver_version=driver,
        cuda_version=cuda,
        gpus=gpus,
        links=links,
        errors=errors,
    )


def _read_gpu(nvml: Any, nvml_error: type[BaseException], index: int, handle: Any, errors: list[str]) -> GpuInfo:
    """Identity and memory are required (a GPU without them is skipped); the rest may be None."""
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)

    def metric(what: str, read: Any) -> Any:
        return _optional(read, nvml_error, errors, f"GPU {index} {what}")

    power_mw = metric("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    limit_mw = metric("power limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    return GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        utilization_gpu_pct=metric("utilization", lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
        temperature_c=metric("temperature", lambda: int(nvml.nvmlDeviceGetTemperature(handle, _TEMPERATURE_GPU))),
        power_w=power_mw / 1000 if power_mw is not None else None,
        power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
    )


def _read_links(
    nvml: Any, nvml_error: type[BaseException], handles: dict[int, Any], errors: list[str]
) -> list[GpuLink]:
    """NVLink first, like `nvidia-smi topo -m`; otherwise the PCIe common ancestor.

    A GPU's active links are matched to peers by the remote end's PCI bus id. Links whose remote
    end is not one of our GPUs go to an NVSwitch: such pairs are NVLink when NVML says P2P over
    NVLink works between them, with the smaller of the two GPUs' switch-link counts.
    """
    bus_to_index: dict[tuple[int, int, int], int] = {}
    for index, handle in handles.items():
        try:
            bus_to_index[_pci_key(nvml.nvmlDeviceGetPciInfo(handle))] = index
        except (nvml_error, ValueError) as exc:
            errors.append(f"GPU {index} PCI bus id: {_describe(exc)}")

    max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", _DEFAULT_NVLINK_MAX_LINKS))
    direct: dict[tuple[int, int], int] = {}
    switch_links: dict[int, int] = dict.fromkeys(handles, 0)
    for index, handle in handles.items():
        for link in range(max_links):
            try:
                if nvml.nvmlDeviceGetNvLinkState(handle, link) != _NVLINK_STATE_ACTIVE:
                    continue
                peer = bus_to_index.get(_pci_key(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)))
            except (nvml_error, ValueError):
                continue  # no such link on this GPU, or no NVLink at all: the normal case on PCIe cards
            if peer is None:
                switch_links[index] += 1
            elif peer != index:
                direct[(index, peer)] = direct.get((index, peer), 0) + 1

    links: list[GpuLink] = []
    indices = sorted(handles)
    for pos, a in enumerate(indices):
        for b in indices[pos + 1 :]:
            count = max(direct.get((a, b), 0), direct.get((b, a), 0))
            if count or _p2p_over_nvlink(nvml, nvml_error, handles[a], handles[b]):
                links.append(GpuLink(a, b, "NVLINK", count or min(switch_links[a], switch_links[b])))
                continue
            try:
                level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b]))
            except nvml_error as exc:
                errors.append(f"GPU {a}-{b} topology: {_describe(exc)}")
                continue
            links.append(GpuLink(a, b, _PCIE_LEVELS.get(level, "SYS")))  # unknown level: assume the farthest
    return links


def _p2p_over_nvlink(nvml: Any, nvml_error: type[BaseException], a: Any, b: Any) -> bool:
    try:
        return nvml.nvmlDeviceGetP2PStatus(a, b, _P2P_CAPS_INDEX_NVLINK) == _P2P_STATUS_OK
    except nvml_error:
        return False


def _pci_key(info: Any) -> tuple[int, int, int]:
    """(domain, bus, device) from a PCI info struct: parsed from `busId`, since the short and long
    domain spellings ("0000:07:00.0", "00000000:07:00.0") must match; the numeric fields otherwise."""
    bus_id = _text(getattr(info, "busId", "") or "")
    if bus_id:
        head, _, device_function = bus_id.rpartition(":")
        domain, _, bus = head.rpartition(":")
        return int(domain or "0", 16), int(bus, 16), int(device_function.split(".")[0], 16)
    return int(info.domain), int(info.bus), int(info.device)


def _optional(read: Any, nvml_error: type[BaseException], errors: list[str], what: str) -> Any:
    """A value the device may simply not support: None then, and an error only if it is not that."""
    try:
        return read()
    except nvml_error as exc:
        if getattr(exc, "value", None) != _ERROR_NOT_SUPPORTED:
            errors.append(f"{what}: {_describe(exc)}")
        return None


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ calls back into NVML, which may be the thing that is broken
        text = ""
    return text or type(exc).__name__
