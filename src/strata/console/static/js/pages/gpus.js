// GPUs: what NVML reports, or a plain "no GPUs".
import { api } from "../api.js";
import { h, card, table, fmt } from "../dom.js";

export async function render(view) {
  view.append(h("h1", {}, "GPUs"));
  const inventory = await api("/admin/gpus");
  if (!inventory.available || !inventory.gpus.length) {
    view.append(card(null, h("p", { id: "no-gpus" }, "No GPUs on this machine."), h("p", { class: "muted" }, inventory.reason || "")));
    return;
  }
  const gib = (b) => `${(b / 2 ** 30).toFixed(1)} GiB`;
  view.append(card(`Driver ${inventory.driver_version ?? "?"}, CUDA ${inventory.cuda_version ?? "?"}`, table([
    { label: "#", value: (g) => g.index, num: true },
    { label: "Name", value: (g) => g.name },
    { label: "Memory", value: (g) => `${gib(g.memory_used_bytes)} / ${gib(g.memory_total_bytes)}`, num: true },
    { label: "Utilisation", value: (g) => (g.utilization_gpu_pct === null ? "–" : `${g.utilization_gpu_pct}%`), num: true },
    { label: "Temperature", value: (g) => (g.temperature_c === null ? "–" : `${g.temperature_c} °C`), num: true },
    { label: "Power", value: (g) => (g.power_w === null ? "–" : `${fmt.num(g.power_w)} / ${fmt.num(g.power_limit_w)} W`), num: true },
  ], inventory.gpus)));
  if (inventory.links.length) {
    view.append(card("Topology", table([
      { label: "GPUs", value: (l) => `${l.a} ↔ ${l.b}` },
      { label: "Link", value: (l) => l.kind + (l.nvlink_count ? ` ×${l.nvlink_count}` : "") },
    ], inventory.links)));
  }
}
