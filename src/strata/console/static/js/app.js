// The console's shell: who is logged in, the pages that role may see, and the hash router (#/runs/abc).
import { api, ApiFailure } from "./api.js";
import { h, failure } from "./dom.js";
import * as overview from "./pages/overview.js";
import * as runs from "./pages/runs.js";
import * as run from "./pages/run.js";
import * as playground from "./pages/playground.js";
import * as keys from "./pages/keys.js";
import * as usage from "./pages/usage.js";
import * as audit from "./pages/audit.js";
import * as models from "./pages/models.js";
import * as gpus from "./pages/gpus.js";

// [path, title, module, permission needed (any page a role may not use is not offered)]
const PAGES = [
  ["", "Overview", overview, null],
  ["runs", "Runs", runs, "runs:read"],
  ["playground", "Playground", playground, "models:invoke"],
  ["keys", "Keys", keys, "keys:manage"],
  ["usage", "Usage", usage, "runs:read"],
  ["audit", "Audit", audit, "audit:read"],
  ["models", "Models", models, "deployments:read"],
  ["gpus", "GPUs", gpus, "gpus:read"],
];

const view = document.getElementById("view");
let me = null;
let cleanup = null;
let shown = 0; // which navigation is on screen: a page that finishes loading after the next one started is undone

const may = (permission) => !permission || me.permissions.includes(permission);

function showLogin(message) {
  document.getElementById("nav").replaceChildren();
  document.getElementById("who").textContent = "";
  document.getElementById("logout").hidden = true;
  const key = h("input", { type: "password", name: "key", placeholder: "sk-strata-…", autocomplete: "off", required: true });
  const error = h("p", { class: "error" }, message || "");
  const form = h("form", { class: "card login", id: "login" },
    h("h1", {}, "Log in to Strata"),
    h("label", {}, "API key", key),
    error,
    h("button", { type: "submit" }, "Log in"),
    h("p", { class: "muted" }, "The key is kept in an HttpOnly session cookie; log out to forget it."));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("/console/login", { method: "POST", body: { key: key.value } });
      await start();
    } catch (e) {
      error.textContent = e.status === 401 ? "That key is not valid." : e.message;
    }
  });
  view.replaceChildren(form);
  key.focus();
}

async function start() {
  try {
    me = await api("/v1/me");
  } catch (e) {
    if (e instanceof ApiFailure && e.status === 401) return showLogin();
    view.replaceChildren(failure(e));
    return;
  }
  document.getElementById("who").textContent = `${me.user} · ${me.role}`;
  const logout = document.getElementById("logout");
  logout.hidden = false;
  logout.onclick = async () => {
    await api("/console/logout", { method: "POST" });
    me = null;
    location.hash = "#/";
    showLogin("Logged out.");
  };
  const nav = document.getElementById("nav");
  nav.replaceChildren(...PAGES.filter(([, , , p]) => may(p)).map(([path, title]) => h("a", { href: `#/${path}`, "data-page": path || "overview" }, title)));
  route();
}

function route() {
  if (!me) return;
  if (cleanup) cleanup();
  cleanup = null;
  const mine = ++shown;
  const [first, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  let page = PAGES.find(([path]) => path === first);
  let module = page?.[2];
  if (first === "runs" && rest.length) module = run;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.getAttribute("href") === `#/${first}`);
  if (!page || !may(page[3])) {
    view.replaceChildren(h("h1", {}, "Not here"), h("p", { class: "muted" }, "This page does not exist or your role may not use it."));
    return;
  }
  const box = h("div"); // this navigation's own: a page still loading when the next starts draws off screen
  view.replaceChildren(box);
  const ctx = { me, may, params: rest.map(decodeURIComponent) };
  Promise.resolve(module.render(box, ctx))
    .then((done) => {
      if (typeof done !== "function") return;
      if (mine === shown) cleanup = done;
      else done();
    })
    .catch((e) => {
      if (e instanceof ApiFailure && e.status === 401) return showLogin("Your session ended: log in again.");
      box.append(failure(e));
    });
}

window.addEventListener("hashchange", route);
start();
