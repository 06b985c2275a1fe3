// The API, with the session cookie the browser holds (HttpOnly: never readable here). Writes repeat the
// strata_csrf cookie in X-CSRF-Token, which the server compares (double submit).

export class ApiFailure extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export const csrf = () => (document.cookie.split("; ").find((c) => c.startsWith("strata_csrf=")) || "").slice(12);

function request(path, { method = "GET", body, params, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrf();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal, credentials: "same-origin" });
}

export async function api(path, options = {}) {
  const response = await request(path, options);
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiFailure(response.status, body);
  return body;
}

// Server-sent events from a GET or a POST: yields {event, data} with data parsed as JSON where it is JSON.
export async function* events(path, options = {}) {
  const response = await request(path, options);
  if (!response.ok) {
    const text = await response.text();
    throw new ApiFailure(response.status, text ? JSON.parse(text) : null);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      const raw = data.join("\n");
      let parsed = raw;
      try { parsed = JSON.parse(raw); } catch { /* [DONE] and other plain text */ }
      yield { event, data: parsed };
    }
  }
}
