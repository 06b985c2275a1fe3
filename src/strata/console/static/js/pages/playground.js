// Playground: chat with a model (streamed chat completions) or an agent (a streamed run), with tokens,
// time to first token, latency and cost.
import { api, events } from "../api.js";
import { h, card, fmt, failure } from "../dom.js";

export async function render(view, { may }) {
  view.append(h("h1", {}, "Playground"));
  const [models, agents] = await Promise.all([
    api("/v1/models"),
    may("agents:invoke") ? api("/v1/agents").catch(() => ({ data: [] })) : { data: [] },
  ]);
  const target = h("select", { name: "target" },
    h("optgroup", { label: "Models" }, models.data.map((m) => h("option", { value: `model:${m.id}` }, m.id))),
    agents.data.length ? h("optgroup", { label: "Agents" }, agents.data.map((a) => h("option", { value: `agent:${a.name}` }, a.name))) : null);
  const input = h("textarea", { name: "message", placeholder: "Say something…", required: true });
  const send = h("button", { type: "submit" }, "Send");
  const reset = h("button", { type: "button", class: "secondary" }, "New conversation");
  const transcript = h("div", { class: "messages", id: "transcript" });
  const stats = h("div", { class: "stats", id: "stats" });
  const form = h("form", {}, h("div", { class: "inline" }, h("label", {}, "Talk to ", target), reset), input, h("div", {}, send));
  view.append(card(null, h("div", { class: "playground" }, transcript, stats, form)));

  let history = [];
  let session = null;
  reset.addEventListener("click", () => { history = []; session = null; transcript.replaceChildren(); stats.replaceChildren(); });
  target.addEventListener("change", () => reset.click());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    send.disabled = true;
    transcript.append(h("div", { class: "msg user" }, h("span", { class: "role" }, "user"), text));
    const answer = h("div", { class: "msg assistant" });
    const body = h("span", { class: "answer" });
    answer.append(h("span", { class: "role" }, "assistant"), body);
    transcript.append(answer);
    const [kind, name] = [target.value.slice(0, target.value.indexOf(":")), target.value.slice(target.value.indexOf(":") + 1)];
    try {
      const result = kind === "model" ? await chat(name, history, text, body) : await runAgent(name, session, text, body);
      if (kind === "agent") session = result.session;
      history.push({ role: "user", content: text }, { role: "assistant", content: body.textContent });
      stats.replaceChildren(...[
        h("span", { id: "stat-tokens" }, `tokens ${fmt.num(result.prompt)} in / ${fmt.num(result.completion)} out`),
        h("span", { id: "stat-ttft" }, `first token ${fmt.ms(result.ttft)}`),
        h("span", { id: "stat-latency" }, `latency ${fmt.ms(result.latency)}`),
        h("span", { id: "stat-cost" }, `cost ${result.cost === null ? "–" : fmt.usd(result.cost)}`),
        result.run && h("a", { href: `#/runs/${result.run}` }, "open the run"),
      ].filter(Boolean));
    } catch (e) {
      answer.append(failure(e));
    } finally {
      send.disabled = false;
    }
  });
}

async function chat(model, history, text, out) {
  const started = performance.now();
  let ttft = null;
  let usage = {};
  const body = { model, messages: [...history, { role: "user", content: text }], stream: true, stream_options: { include_usage: true } };
  for await (const { data } of events("/v1/chat/completions", { method: "POST", body })) {
    if (typeof data !== "object") continue;
    if (data.error) throw new Error(data.error.message);
    const delta = data.choices?.[0]?.delta?.content;
    if (delta) {
      if (ttft === null) ttft = (performance.now() - started) / 1000;
      out.textContent += delta;
    }
    if (data.usage) usage = data.usage;
  }
  const latency = (performance.now() - started) / 1000;
  return { prompt: usage.prompt_tokens, completion: usage.completion_tokens, ttft, latency, cost: await lastCost(model, started) };
}

// A streamed answer's cost is settled when the stream ends: read it from the caller's newest usage row.
async function lastCost(model, startedAt) {
  const since = new Date(Date.now() - (performance.now() - startedAt) - 1000).toISOString();
  const usage = await api("/v1/usage", { params: { group_by: "model", from: since } }).catch(() => null);
  const row = usage?.data.find((r) => r.group === model);
  return row ? row.cost_usd : null;
}

async function runAgent(agent, session, text, out) {
  const started = performance.now();
  let ttft = null;
  let runId = null;
  const body = { input: text, mode: "stream", ...(session ? { session_id: session } : {}) };
  for await (const { event, data } of events(`/v1/agents/${encodeURIComponent(agent)}/runs`, { method: "POST", body })) {
    runId = runId || data.run_id;
    if (event === "message.delta" && data.content) {
      if (ttft === null) ttft = (performance.now() - started) / 1000;
      out.textContent += data.content;
    }
    if (event === "approval.requested") out.textContent += "\n[waiting for approval: open the run]";
  }
  const run = await api(`/v1/runs/${runId}`);
  if (!out.textContent && run.output) out.textContent = typeof run.output === "string" ? run.output : JSON.stringify(run.output);
  return { prompt: run.usage.prompt_tokens, completion: run.usage.completion_tokens, ttft, latency: (performance.now() - started) / 1000,
    cost: run.cost_usd, run: runId, session: run.session_id };
}
