// One run: conversation, steps with tool arguments and results, the trace as a waterfall to scale, cost;
// live while it goes (its event stream), with approve / deny / cancel for those who may.
import { api, events } from "../api.js";
import { h, card, table, status, fmt, seconds, failure } from "../dom.js";

const ENDED = ["completed", "failed", "cancelled"];

export async function render(view, { may, params }) {
  const id = params[0];
  const live = new AbortController();
  const costs = new Map(); // turn -> the model step's cost, from the run's message.completed events
  let timer = null;
  const parts = {
    head: h("div"), live: h("pre", { id: "run-live", hidden: true }), pending: h("div"),
    conversation: h("div", { class: "messages" }),
    steps: h("div"), trace: h("div", { class: "waterfall" }),
  };
  view.append(parts.head, parts.live, parts.pending, card("Conversation", parts.conversation), card("Steps", parts.steps),
    card("Trace", parts.trace));

  async function refresh() {
    const path = `/v1/runs/${encodeURIComponent(id)}`;
    const [run, trace] = await Promise.all([api(path), api(`${path}/trace`).catch(() => ({ spans: [] }))]);
    const messages = await api(`/v1/sessions/${encodeURIComponent(run.session_id)}/messages`).catch(() => ({ data: [] }));
    drawHead(parts.head, run, may, refresh);
    drawPending(parts.pending, run, may, refresh);
    drawConversation(parts.conversation, messages.data.filter((m) => m.run_id === run.id));
    drawSteps(parts.steps, run, costs);
    drawWaterfall(parts.trace, trace.spans);
    return run;
  }
  const soon = () => { clearTimeout(timer); timer = setTimeout(() => refresh().catch(() => {}), 150); };

  await refresh();
  // The stored events, then live ones until the run ends (an ended run's stream replays and closes).
  follow(id, live.signal, (event) => {
    if (event?.event === "message.delta") { // the model's answer as it is written; the step replaces it
      parts.live.hidden = false;
      parts.live.textContent += event.data.content || "";
      return;
    }
    if (event?.event === "message.completed") {
      costs.set(event.data.turn, event.data.cost_usd);
      parts.live.hidden = true;
      parts.live.textContent = "";
    }
    soon();
  });
  return () => { live.abort(); clearTimeout(timer); };
}

async function follow(id, signal, changed) {
  try {
    for await (const event of events(`/v1/runs/${encodeURIComponent(id)}/events`, { signal })) {
      changed(event);
    }
  } catch (e) {
    if (e.name !== "AbortError") console.warn("run events ended", e);
  }
  changed(null);
}

function drawHead(el, run, may, refresh) {
  const actions = [];
  if (may("agents:invoke") && !ENDED.includes(run.status)) {
    actions.push(h("button", { class: "danger", id: "cancel-run", onclick: async () => {
      await api(`/v1/runs/${run.id}/cancel`, { method: "POST" });
      await refresh();
    } }, "Cancel run"));
  }
  el.replaceChildren(...[
    h("h1", {}, "Run ", h("code", {}, run.id), " ", h("span", { id: "run-status" }, status(run.status))),
    h("div", { class: "tiles" },
      tile("Agent", `${run.agent} v${run.agent_version ?? "?"}`),
      tile("Steps", fmt.num(run.steps_taken)),
      tile("Tokens", `${fmt.num(run.usage.prompt_tokens)} in / ${fmt.num(run.usage.completion_tokens)} out`),
      tile("Cost", fmt.usd(run.cost_usd), "run-cost"),
      tile("Duration", fmt.ms(seconds(run.started_at || run.created_at, run.finished_at))),
    ),
    run.status_reason ? h("p", { class: "muted" }, run.status_reason) : null,
    run.output ? card("Answer", h("pre", { id: "run-output" }, fmt.json(run.output))) : null,
    ...actions,
  ].filter(Boolean));
}

function tile(label, value, id) {
  return h("div", { class: "tile", id }, h("div", { class: "value" }, value), h("div", { class: "label" }, label));
}

function drawPending(el, run, may, refresh) {
  const calls = run.pending_approval || [];
  if (!calls.length) return el.replaceChildren();
  const decide = (call, decision) => async () => {
    try {
      await api(`/v1/runs/${run.id}/approval`, { method: "POST", body: { decision, call_id: call.id, binding: call.binding } });
    } catch (e) {
      el.append(failure(e));
    }
    await refresh();
  };
  el.replaceChildren(...calls.map((call) => h("div", { class: "pending", "data-call": call.id },
    h("strong", {}, `Waiting for approval: ${call.name}`),
    h("pre", {}, fmt.json(parseMaybe(call.arguments))),
    may("agents:invoke")
      ? h("div", {}, h("button", { class: "approve", onclick: decide(call, "approve") }, "Approve"), " ",
        h("button", { class: "secondary deny", onclick: decide(call, "deny") }, "Deny"))
      : h("p", { class: "muted" }, "Your role may not decide."),
  )));
}

function drawSteps(el, run, costs) {
  const modelTokens = (s) => s.usage.prompt_tokens + s.usage.completion_tokens;
  el.replaceChildren(table([
    { label: "Turn", value: (s) => s.turn, num: true },
    { label: "Kind", value: (s) => s.kind },
    { label: "Name", value: (s) => s.name || "–" },
    { label: "Status", value: (s) => status(s.status) },
    { label: "Duration", value: (s) => fmt.ms(seconds(s.started_at, s.finished_at)), num: true },
    { label: "Tokens", value: (s) => (modelTokens(s) ? `${s.usage.prompt_tokens} / ${s.usage.completion_tokens}` : "–"), num: true },
    { label: "Cost", value: (s) => (s.kind === "model" && costs.has(s.turn) ? fmt.usd(costs.get(s.turn)) : "–"), num: true },
    { label: "Input / arguments", value: (s) => h("pre", {}, fmt.json(stepInput(s))) },
    { label: "Output / result", value: (s) => h("pre", {}, s.error ? `error: ${fmt.json(s.error)}` : fmt.json(stepOutput(s))) },
  ], run.steps, "No steps yet."));
}

function stepInput(step) {
  const input = step.input;
  if (step.kind === "model" && input && typeof input === "object") {
    return `${input.messages} messages${input.tools?.length ? `, tools: ${input.tools.join(", ")}` : ""}`;
  }
  if (input && typeof input === "object" && "arguments" in input) return parseMaybe(input.arguments);
  return input ?? "";
}

function stepOutput(step) {
  const output = step.output;
  if (output && typeof output === "object" && output.role === "assistant") {
    const calls = (output.tool_calls || []).map((c) => `→ ${c.function.name}(${c.function.arguments})`);
    return [output.content || "", ...calls].filter(Boolean).join("\n");
  }
  return output ?? "";
}

function parseMaybe(text) {
  if (typeof text !== "string") return text;
  try { return JSON.parse(text); } catch { return text; }
}

function drawConversation(el, messages) {
  el.replaceChildren(...messages.map((m) => {
    const calls = (m.tool_calls || []).map((c) => `→ ${c.function?.name}(${c.function?.arguments})`);
    const text = [typeof m.content === "string" ? m.content : fmt.json(m.content ?? ""), ...calls].filter(Boolean).join("\n");
    return h("div", { class: `msg ${m.role}` }, h("span", { class: "role" }, m.role + (m.name ? ` · ${m.name}` : "")), text);
  }));
  if (!messages.length) el.append(h("p", { class: "muted" }, "No messages yet."));
}

function drawWaterfall(el, spans) {
  if (!spans.length) return el.replaceChildren(h("p", { class: "muted" }, "No spans (yet): spans are stored as they end."));
  const start = (s) => new Date(s.start_time).getTime();
  const t0 = Math.min(...spans.map(start));
  const t1 = Math.max(...spans.map((s) => start(s) + s.duration_ms));
  const total = Math.max(t1 - t0, 1);
  const byId = new Map(spans.map((s) => [s.span_id, s]));
  const depth = (s) => { let d = 0; for (let p = byId.get(s.parent_span_id); p && d < 20; p = byId.get(p.parent_span_id)) d++; return d; };
  const ordered = [...spans].sort((a, b) => start(a) - start(b) || depth(a) - depth(b));
  el.replaceChildren(
    h("p", { class: "muted" }, `${spans.length} spans over ${fmt.ms(total / 1000)}`),
    ...ordered.map((s) => h("div", { class: "row", "data-span": s.name },
      h("span", { class: "name", title: s.name, style: `padding-left:${depth(s) * 12}px` }, s.name),
      h("span", { class: "track" }, h("span", {
        class: `bar${s.status === "error" ? " error" : ""}`,
        style: `left:${((start(s) - t0) / total) * 100}%;width:${(s.duration_ms / total) * 100}%`,
      })),
      h("span", { class: "num" }, fmt.ms(s.duration_ms / 1000)),
    )),
  );
}
