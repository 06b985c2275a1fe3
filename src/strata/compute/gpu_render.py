"""`strata gpus` for people: a table of GPUs and a topology matrix read like `nvidia-smi topo -m`."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from strata.compute.inventory import GpuInfo, GpuInventory, GpuLink

_GIB = 1024**3
_LEGEND = (
    "X = self  NV# = # NVLinks  PIX = one PCIe switch  PXB = several PCIe switches  "
    "PHB = a PCIe host bridge  NODE = host bridges in one NUMA node  SYS = across NUMA nodes"
)


def render_inventory(inventory: GpuInventory) -> RenderableType:
    """Everything `strata gpus` prints; a single plain line when there is nothing to show."""
    if not inventory.available:
        return Text(f"No NVIDIA GPUs found: {inventory.reason or 'unknown reason'}")
    parts: list[RenderableType] = [gpu_table(inventory)]
    if len(inventory.gpus) > 1:
        parts.append(topology_table(inventory))
        parts.append(Text(_LEGEND, style="dim"))
    if inventory.errors:
        parts.append(Text("Partial inventory, these queries failed:", style="yellow"))
        parts.extend(Text(f"  {error}", style="yellow") for error in inventory.errors)
    return Group(*parts)


def gpu_table(inventory: GpuInventory) -> Table:
    title = f"Driver {inventory.driver_version or '?'}  CUDA {inventory.cuda_version or '?'}"
    table = Table(title=title, title_justify="left")
    table.add_column("GPU", justify="right")
    table.add_column("Name")
    table.add_column("Memory used / total", justify="right")
    table.add_column("Util", justify="right")
    table.add_column("Temp", justify="right")
    table.add_column("Power / limit", justify="right")
    for gpu in inventory.gpus:
        table.add_row(
            str(gpu.index),
            gpu.name,
            f"{gpu.memory_used_bytes / _GIB:.1f} / {gpu.memory_total_bytes / _GIB:.1f} GiB",
            _or_na(gpu.utilization_gpu_pct, "{} %"),
            _or_na(gpu.temperature_c, "{} °C"),
            _power(gpu),
        )
    return table


def topology_table(inventory: GpuInventory) -> Table:
    """One row and column per GPU; "?" where NVML could not say how a pair is connected."""
    table = Table(title="Topology", title_justify="left")
    table.add_column("")
    for gpu in inventory.gpus:
        table.add_column(f"GPU{gpu.index}", justify="center")
    for row in inventory.gpus:
        cells = [
            "X" if row.index == col.index else link_label(inventory.link(row.index, col.index))
            for col in inventory.gpus
        ]
        table.add_row(f"GPU{row.index}", *cells)
    return table


def link_label(link: GpuLink | None) -> str:
    if link is None:
        return "?"
    if link.kind == "NVLINK":
        return f"NV{link.nvlink_count}" if link.nvlink_count else "NV"
    return link.kind


def _power(gpu: GpuInfo) -> str:
    if gpu.power_w is None:
        return "n/a"
    if gpu.power_limit_w is None:
        return f"{gpu.power_w:.0f} W"
    return f"{gpu.power_w:.0f} / {gpu.power_limit_w:.0f} W"


def _or_na(value: int | None, template: str) -> str:
    return "n/a" if value is None else template.format(value)
