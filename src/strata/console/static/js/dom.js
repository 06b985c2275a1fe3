// Building the page: h() makes elements (text is always text, never HTML), fmt formats numbers and times.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function table(columns, rows, empty = "Nothing yet.") {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : "" }, c.label)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map((c) => h("td", { class: c.num ? "num" : "" }, c.value(row)))))),
  );
}

export const status = (value) => h("span", { class: `status ${value}` }, value);

export function card(title, ...children) {
  return h("section", { class: "card" }, title ? h("h2", {}, title) : null, ...children);
}

export function failure(error) {
  return h("p", { class: "error" }, String(error.message || error));
}

export const fmt = {
  usd: (v) => (v === null || v === undefined ? "–" : v === 0 || v >= 0.1 ? `$${v.toFixed(2)}` : `$${v.toPrecision(2)}`),
  num: (v, digits = 0) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en", { maximumFractionDigits: digits })),
  ms: (seconds) => (seconds === null || seconds === undefined ? "–" : seconds < 1 ? `${(seconds * 1000).toFixed(0)} ms` : `${seconds.toFixed(2)} s`),
  pct: (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`),
  time: (iso) => (iso ? new Date(iso).toLocaleString("en-GB", { hour12: false }) : "–"),
  json: (v) => (typeof v === "string" ? v : JSON.stringify(v, null, 2)),
};

export const seconds = (a, b) => (a && b ? (new Date(b) - new Date(a)) / 1000 : null);
