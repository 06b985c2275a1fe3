// Usage and cost: by key, user, agent, model or day, as a table and a chart; the budgets that apply.
import { api } from "../api.js";
import { h, card, table, fmt } from "../dom.js";
import { lineChart } from "../chart.js";

const GROUPS = ["day", "model", "agent", "user", "key"];

export async function render(view, { may }) {
  view.append(h("h1", {}, "Usage and cost"));
  const group = h("select", { name: "group_by" }, GROUPS.map((g) => h("option", { value: g }, g)));
  const from = h("input", { name: "from", type: "date" });
  const to = h("input", { name: "to", type: "date" });
  const form = h("form", { class: "inline", id: "usage-filters" },
    h("label", {}, "Group by", group), h("label", {}, "From", from), h("label", {}, "To", to), h("button", { type: "submit" }, "Show"));
  const chart = h("div", { id: "usage-chart" });
  const rows = h("div", { id: "usage-table" });
  const budgets = h("div", { id: "budgets" });
  const scope = may("usage:read_all") ? "everyone's usage" : "your own usage";
  view.append(card(null, h("p", { class: "muted" }, `Showing ${scope}; default: this month.`), form, chart, rows), card("Budgets", budgets));

  async function load() {
    const usage = await api("/v1/usage", { params: { group_by: group.value, from: from.value, to: to.value } });
    const max = Math.max(...usage.data.map((r) => r.cost_usd), 1e-12);
    rows.replaceChildren(table([
      { label: group.value, value: (r) => r.group ?? "(none)" },
      { label: "Requests", value: (r) => fmt.num(r.requests), num: true },
      { label: "Errors", value: (r) => fmt.num(r.errors), num: true },
      { label: "Tokens in", value: (r) => fmt.num(r.prompt_tokens), num: true },
      { label: "Tokens out", value: (r) => fmt.num(r.completion_tokens), num: true },
      { label: "p50", value: (r) => fmt.ms(r.latency_p50_s), num: true },
      { label: "p95", value: (r) => fmt.ms(r.latency_p95_s), num: true },
      { label: "Cost", value: (r) => h("span", {}, h("span", { class: "bar-cell", style: `width:${(r.cost_usd / max) * 80}px` }), fmt.usd(r.cost_usd)), num: true },
    ], usage.data, "No usage in this period."));
    const total = usage.total;
    rows.append(h("p", { id: "usage-total" }, `Total: ${fmt.num(total?.requests ?? 0)} requests, ${fmt.num(total?.total_tokens ?? 0)} tokens, ${fmt.usd(total?.cost_usd ?? 0)}`));
    chart.replaceChildren();
    if (group.value === "day" && usage.data.length) {
      const days = [...usage.data].sort((a, b) => (a.group < b.group ? -1 : 1));
      lineChart(chart, { times: days.map((d) => Date.parse(d.group) / 1000),
        series: [{ label: "cost per day", values: days.map((d) => d.cost_usd) }], format: (v) => fmt.usd(v), pad_s: 86400 });
    }
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  await load();
  const standing = await api("/v1/budgets");
  budgets.replaceChildren(table([
    { label: "Scope", value: (b) => `${b.scope} ${b.name}` },
    { label: "Period", value: (b) => b.period },
    { label: "Kind", value: (b) => b.kind },
    { label: "Limit", value: (b) => fmt.usd(b.limit_usd), num: true },
    { label: "Spent", value: (b) => fmt.usd(b.spent_usd), num: true },
    { label: "Left", value: (b) => fmt.usd(b.left_usd), num: true },
    { label: "Resets", value: (b) => fmt.time(b.resets_at) },
  ], standing.data, "No budget applies to you."));
}
