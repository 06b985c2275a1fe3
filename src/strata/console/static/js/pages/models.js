// Models: deployments (health, in-flight, breakers), versions per replica, and hot swap for operators.
import { api } from "../api.js";
import { h, card, table, status, fmt, failure } from "../dom.js";

export const deploymentColumns = [
  { label: "Model", value: (d) => d.model },
  { label: "Deployment", value: (d) => d.deployment },
  { label: "Kind", value: (d) => d.kind },
  { label: "Health", value: (d) => status(d.healthy ? "healthy" : "unhealthy") },
  { label: "State", value: (d) => d.state },
  { label: "In flight", value: (d) => fmt.num(d.in_flight), num: true },
  { label: "Queued", value: (d) => fmt.num(d.queued), num: true },
  { label: "Breaker", value: (d) => status(d.breaker.state) },
  { label: "Failures (window)", value: (d) => `${d.breaker.window_failures}/${d.breaker.window_requests}`, num: true },
];

export async function render(view, { may }) {
  view.append(h("h1", {}, "Models"));
  const [deployments, models] = await Promise.all([api("/admin/deployments"), api("/admin/models")]);
  view.append(card("Deployments", table(deploymentColumns, deployments.data)));
  view.append(card("Versions", table([
    { label: "Model", value: (m) => m.model },
    { label: "Version", value: (m) => m.version ?? "–", num: true },
    { label: "State", value: (m) => m.state },
    { label: "Serving", value: (m) => describe(m.reference) },
    { label: "Replicas", value: (m) => m.replicas.map((r) => `${r.replica}: v${r.version ?? "?"} ${r.state}`).join(", ") || "this one" },
  ], models.data)));
  if (may("deployments:write")) view.append(card("Hot swap", swapForm(models.data.map((m) => m.model))));
}

// Where a version came from: {"profile": "big"}, the configuration file, or an endpoint given over the API.
function describe(reference) {
  if (!reference) return "–";
  return Object.entries(reference).map(([k, v]) => (typeof v === "object" ? `${k}: ${JSON.stringify(v)}` : `${k}: ${v}`)).join(", ");
}

function swapForm(names) {
  const model = h("select", { name: "model" }, names.map((n) => h("option", { value: n }, n)));
  const profile = h("input", { name: "profile", placeholder: "a deploy.profiles name", required: true });
  const result = h("div");
  const form = h("form", { class: "inline" },
    h("label", {}, "Model", model), h("label", {}, "Profile", profile), h("button", { type: "submit" }, "Deploy"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    result.replaceChildren(h("p", { class: "muted" }, "Deploying…"));
    try {
      const done = await api(`/admin/models/${encodeURIComponent(model.value)}/deploy`, { method: "POST", body: { profile: profile.value } });
      result.replaceChildren(h("p", {}, `${done.model} now serves version ${done.version} (${done.state}).`));
    } catch (e) {
      result.replaceChildren(failure(e));
    }
  });
  return h("div", {}, h("p", { class: "muted" }, "Every replica converges on the new version; requests in flight finish on the old one."), form, result);
}
