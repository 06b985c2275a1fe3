// Runs: the filterable list, newest first, a page at a time.
import { api } from "../api.js";
import { h, card, table, status, fmt } from "../dom.js";

const STATUSES = ["", "queued", "running", "awaiting_approval", "completed", "failed", "cancelled"];

export const runColumns = [
  { label: "Run", value: (r) => h("a", { href: `#/runs/${r.id}` }, r.id) },
  { label: "Agent", value: (r) => r.agent },
  { label: "Status", value: (r) => status(r.status) },
  { label: "Steps", value: (r) => fmt.num(r.steps_taken), num: true },
  { label: "Tokens", value: (r) => fmt.num(r.usage.total_tokens), num: true },
  { label: "Cost", value: (r) => fmt.usd(r.cost_usd), num: true },
  { label: "Created", value: (r) => fmt.time(r.created_at) },
];

export async function render(view, { may }) {
  view.append(h("h1", {}, "Runs"));
  const agent = h("input", { name: "agent", placeholder: "any" });
  const state = h("select", { name: "status" }, STATUSES.map((s) => h("option", { value: s }, s || "any")));
  const user = may("runs:read_all") ? h("input", { name: "user", placeholder: "anyone" }) : null;
  const from = h("input", { name: "from", type: "date" });
  const list = h("div", { id: "runs-list" });
  const more = h("button", { class: "secondary", hidden: true }, "More");
  const form = h("form", { class: "inline", id: "run-filters" },
    h("label", {}, "Agent", agent), h("label", {}, "Status", state), user && h("label", {}, "User", user),
    h("label", {}, "From", from), h("button", { type: "submit" }, "Filter"));
  view.append(card(null, form, list, more));

  let rows = [];
  let cursor = null;
  async function load(reset) {
    const params = { agent: agent.value, status: state.value, user: user?.value, from: from.value, limit: 25 };
    if (!reset && cursor) params.cursor = cursor;
    const page = await api("/v1/runs", { params });
    rows = reset ? page.data : [...rows, ...page.data];
    cursor = page.next_cursor;
    more.hidden = !page.has_more;
    list.replaceChildren(table(runColumns, rows, "No runs match."));
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); load(true); });
  more.addEventListener("click", () => load(false));
  await load(true);
}
