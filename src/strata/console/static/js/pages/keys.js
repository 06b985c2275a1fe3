// Keys (admin): create (the secret is shown once), rotate, revoke, change limits.
import { api } from "../api.js";
import { h, card, table, status, fmt, failure } from "../dom.js";

const ROLES = ["user", "developer", "operator", "auditor", "admin"];
const number = (input) => (input.value === "" ? undefined : Number(input.value));

export async function render(view) {
  view.append(h("h1", {}, "API keys"));
  const secret = h("div", { id: "secret" });
  const list = h("div", { id: "keys-list" });
  view.append(card("Create a key", createForm(secret, () => load())), secret, card("Keys", list));

  async function load() {
    const keys = await api("/admin/keys");
    list.replaceChildren(table([
      { label: "Name", value: (k) => k.name },
      { label: "User", value: (k) => k.user },
      { label: "Role", value: (k) => k.role },
      { label: "Prefix", value: (k) => h("code", {}, k.prefix) },
      { label: "Limits", value: (k) => limits(k) },
      { label: "Created", value: (k) => fmt.time(k.created_at) },
      { label: "Expires", value: (k) => fmt.time(k.expires_at) },
      { label: "State", value: (k) => status(k.active ? "ok" : "bad") },
      { label: "", value: (k) => actions(k, secret, load) },
    ], keys.data));
  }
  await load();
}

function limits(key) {
  const parts = [key.rpm && `${fmt.num(key.rpm)} req/min`, key.tpm && `${fmt.num(key.tpm)} tok/min`,
    key.budget_usd && `${fmt.usd(key.budget_usd)}/month`];
  return parts.filter(Boolean).join(", ") || "none";
}

function createForm(secret, created) {
  const name = h("input", { name: "name", required: true, placeholder: "ci-bot" });
  const role = h("select", { name: "role" }, ROLES.map((r) => h("option", { value: r }, r)));
  const user = h("input", { name: "user", placeholder: "default: the name" });
  const rpm = h("input", { name: "rpm", type: "number", min: 1, placeholder: "none" });
  const tpm = h("input", { name: "tpm", type: "number", min: 1, placeholder: "none" });
  const budget = h("input", { name: "budget_usd", type: "number", min: 0.01, step: 0.01, placeholder: "none" });
  const form = h("form", { class: "inline", id: "create-key" },
    h("label", {}, "Name", name), h("label", {}, "Role", role), h("label", {}, "User", user),
    h("label", {}, "Requests/min", rpm), h("label", {}, "Tokens/min", tpm), h("label", {}, "Budget USD/month", budget),
    h("button", { type: "submit" }, "Create"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const key = await api("/admin/keys", { method: "POST", body: {
        name: name.value, role: role.value, user: user.value || undefined, rpm: number(rpm), tpm: number(tpm), budget_usd: number(budget),
      } });
      showSecret(secret, `Key ${key.name} created`, key.key);
      form.reset();
      await created();
    } catch (e) {
      secret.replaceChildren(failure(e));
    }
  });
  return form;
}

function showSecret(el, title, value) {
  el.replaceChildren(h("div", { class: "secret" }, h("strong", {}, `${title}. `),
    "Copy the secret now: it is shown this once. ", h("br"), h("code", { id: "new-secret" }, value)));
}

function actions(key, secret, reload) {
  if (!key.active) return key.revoked_at ? `revoked ${fmt.time(key.revoked_at)}` : "";
  const run = (fn) => async () => {
    try { await fn(); } catch (e) { secret.replaceChildren(failure(e)); }
    await reload();
  };
  const rotate = run(async () => {
    const rotated = await api(`/admin/keys/${key.id}/rotate`, { method: "POST", body: { overlap_s: 3600 } });
    showSecret(secret, `Key ${key.name} rotated (the old secret works for one more hour)`, rotated.key);
  });
  const revoke = run(() => api(`/admin/keys/${key.id}/revoke`, { method: "POST" }));
  const edit = () => {
    const rpm = h("input", { type: "number", min: 1, value: key.rpm ?? "", placeholder: "rpm" });
    const tpm = h("input", { type: "number", min: 1, value: key.tpm ?? "", placeholder: "tpm" });
    const budget = h("input", { type: "number", min: 0.01, step: 0.01, value: key.budget_usd ?? "", placeholder: "USD" });
    const save = run(() => api(`/admin/keys/${key.id}`, { method: "PATCH", body: { rpm: number(rpm), tpm: number(tpm), budget_usd: number(budget) } }));
    cell.replaceChildren(rpm, tpm, budget, h("button", { onclick: save }, "Save"));
  };
  const cell = h("span", { class: "key-actions", "data-key": key.name },
    h("button", { class: "secondary", onclick: edit }, "Limits"), " ",
    h("button", { class: "secondary", onclick: rotate }, "Rotate"), " ",
    h("button", { class: "danger", onclick: revoke }, "Revoke"));
  return cell;
}
