// Overview: the last hour's traffic as charts, spend today, runs in progress, every deployment's state.
import { api } from "../api.js";
import { h, card, table, status, fmt, failure } from "../dom.js";
import { lineChart } from "../chart.js";
import { deploymentColumns } from "./models.js";

const REFRESH_MS = 5000;
const ACTIVE = "queued,running,awaiting_approval";

const CHARTS = [
  ["requests", "Requests per second", [["req/s", "requests_per_s"]], (v) => v.toFixed(2)],
  ["errors", "Error rate (5xx)", [["errors", "error_rate"]], (v) => `${(v * 100).toFixed(1)}%`],
  ["latency", "Latency", [["p50", "latency_p50_s"], ["p95", "latency_p95_s"], ["p99", "latency_p99_s"]], fmt.ms],
  ["ttft", "Time to first token", [["p50", "ttft_p50_s"], ["p95", "ttft_p95_s"]], fmt.ms],
  ["tokens", "Output tokens per second", [["tokens/s", "tokens_per_s"]], (v) => v.toFixed(1)],
];

export async function render(view, { may }) {
  view.append(h("h1", {}, "Overview"));
  const tiles = h("div", { class: "tiles" });
  const charts = h("div", { class: "grid", id: "charts" });
  const active = h("div");
  const deployments = h("div");
  view.append(tiles);
  if (may("metrics:read")) view.append(card("Last hour (this replica)", charts));
  view.append(card("Runs in progress", active));
  if (may("deployments:read")) view.append(card("Deployments", deployments));

  const today = new Date().toISOString().slice(0, 10);
  async function refresh() {
    const [spend, runs] = await Promise.all([
      api("/v1/usage", { params: { group_by: "day", from: today } }),
      api("/v1/runs", { params: { status: ACTIVE, limit: 50 } }),
    ]);
    tiles.replaceChildren(
      tile("Spend today", fmt.usd(spend.total?.cost_usd ?? 0), "spend-today"),
      tile("Requests today", fmt.num(spend.total?.requests ?? 0), "requests-today"),
      tile("Runs in progress", String(runs.data.length) + (runs.has_more ? "+" : ""), "runs-active"),
    );
    active.replaceChildren(table(
      [
        { label: "Run", value: (r) => h("a", { href: `#/runs/${r.id}` }, r.id) },
        { label: "Agent", value: (r) => r.agent },
        { label: "Status", value: (r) => status(r.status) },
        { label: "Started", value: (r) => fmt.time(r.created_at) },
      ],
      runs.data, "No run is in progress."));
    if (may("metrics:read")) drawCharts(charts, (await api("/admin/metrics/series")).data);
    if (may("deployments:read")) deployments.replaceChildren(table(deploymentColumns, (await api("/admin/deployments")).data));
  }

  await refresh();
  const problem = h("div");
  view.append(problem);
  const timer = setInterval(() => refresh().then(() => problem.replaceChildren(), (e) => problem.replaceChildren(failure(e))), REFRESH_MS);
  return () => clearInterval(timer);
}

function tile(label, value, id) {
  return h("div", { class: "tile", id }, h("div", { class: "value" }, value), h("div", { class: "label" }, label));
}

function drawCharts(container, points) {
  const times = points.map((p) => p.time);
  container.replaceChildren(...CHARTS.map(([id, title, lines, format]) => {
    const last = [...points].reverse().find((p) => p[lines[0][1]] !== null);
    const now = last ? format(last[lines[0][1]]) : "–";
    const box = h("div", { class: "chart", id: `chart-${id}` },
      h("h3", {}, title, h("span", { class: "now", "data-now": id }, `${lines[0][0]} now: ${now}`)));
    container.append(box);
    lineChart(box, { times, series: lines.map(([label, key]) => ({ label, values: points.map((p) => p[key]) })), format, span_s: 3600 });
    return box;
  }));
}
