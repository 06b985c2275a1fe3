// Audit (admin, auditor): the trail, filterable, and the hash chain's verification.
import { api } from "../api.js";
import { h, card, table, status, fmt } from "../dom.js";

export async function render(view) {
  view.append(h("h1", {}, "Audit trail"));
  const verify = h("div", { id: "audit-verify" });
  const action = h("input", { name: "action", placeholder: "key.created" });
  const actor = h("input", { name: "actor", placeholder: "key:…" });
  const since = h("input", { name: "since", type: "date" });
  const list = h("div", { id: "audit-list" });
  const next = h("button", { class: "secondary", hidden: true }, "Next page");
  const form = h("form", { class: "inline" }, h("label", {}, "Action", action), h("label", {}, "Actor", actor),
    h("label", {}, "Since", since), h("button", { type: "submit" }, "Filter"));
  view.append(card("Chain verification", verify), card("Events (oldest first)", form, list, next));

  let after = 0;
  async function load(reset) {
    if (reset) after = 0;
    const page = await api("/admin/audit", { params: { action: action.value, actor: actor.value, since: since.value, after_id: after, limit: 100 } });
    after = page.last_id;
    next.hidden = page.data.length < 100;
    list.replaceChildren(table([
      { label: "#", value: (e) => e.id, num: true },
      { label: "Time", value: (e) => fmt.time(e.ts) },
      { label: "Actor", value: (e) => `${e.actor}${e.actor_role ? ` (${e.actor_role})` : ""}` },
      { label: "Action", value: (e) => e.action },
      { label: "Resource", value: (e) => e.resource ?? "" },
      { label: "Outcome", value: (e) => status(e.outcome === "success" ? "ok" : "bad") },
      { label: "Details", value: (e) => h("pre", {}, JSON.stringify(e.details)) },
    ], page.data, "No events match."));
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); load(true); });
  next.addEventListener("click", () => load(false));
  const [result] = await Promise.all([api("/admin/audit/verify"), load(true)]);
  verify.replaceChildren(
    h("p", {}, status(result.ok ? "ok" : "bad"), " ", result.message),
    h("p", { class: "muted" }, `${fmt.num(result.rows_checked)} rows checked, ${result.checkpoints} checkpoints compared.`),
    ...(result.checked || []).map((line) => h("p", { class: "muted" }, line)),
  );
}
