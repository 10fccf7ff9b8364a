// llm-queue playground: streamed chat against /v1/chat/completions, and a list of the key's jobs and batches.
// Plain JS, no dependencies. API paths are relative, so the page also works behind a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "llmq.playground.apiKey";
let history = [];        // the conversation sent with each request: {role, content}, user/assistant alternating
let controller = null;   // AbortController of the request in flight

// --- API helpers ---------------------------------------------------------------------------------

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// The message of an error response: OpenAI's {"error": {"message", "param", "code"}}, else the raw text.
async function errorOf(response) {
  const text = await response.text();
  let message = text.trim().slice(0, 500) || response.statusText;
  try {
    const err = JSON.parse(text).error;
    if (err && err.message) {
      message = err.message + (err.param ? ` (param: ${err.param})` : "") + (err.code ? ` [${err.code}]` : "");
    }
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}: ${message}`;
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers(false) });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

// --- Settings ------------------------------------------------------------------------------------

function numberField(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;   // empty: let the server use its default
  return integer ? parseInt(raw, 10) : Number(raw);
}

function stopSequences() {
  const raw = $("stop").value;
  const parts = raw.includes("\n") ? raw.split("\n") : raw.split(",");
  return parts.map((s) => s.trim()).filter((s) => s !== "");
}

// response_format, logprobs and top_logprobs from the JSON-mode and logprobs switches. Throws an Error (shown
// as the page's error, nothing sent) when the schema is not a JSON object.
function outputOptions() {
  const options = {};
  const kind = $("response-format").value;
  if (kind === "json_object") {
    options.response_format = { type: "json_object" };
  } else if (kind === "json_schema") {
    let schema;
    try {
      schema = JSON.parse($("schema").value);
    } catch (err) {
      throw new Error("The JSON schema is not valid JSON: " + err.message);
    }
    if (schema === null || typeof schema !== "object" || Array.isArray(schema)) {
      throw new Error("The JSON schema must be a JSON object.");
    }
    options.response_format = {
      type: "json_schema", json_schema: { name: $("schema-name").value.trim() || "answer", schema, strict: true },
    };
  }
  if ($("logprobs").checked) {
    options.logprobs = true;
    const top = numberField("top-logprobs", true);
    if (top !== undefined) options.top_logprobs = top;
  }
  return options;
}

function checkSchema() {
  if ($("response-format").value !== "json_schema") return;
  try {
    outputOptions();
    $("schema-status").textContent = "";
  } catch (err) {
    $("schema-status").textContent = err.message;
  }
}

function updateSwitches() {
  $("schema-fields").hidden = $("response-format").value !== "json_schema";
  $("top-logprobs").disabled = !$("logprobs").checked;
  $("logprobs-hint").hidden = !$("logprobs").checked;
  checkSchema();
}

function requestBody(options) {
  const body = { messages: history, stream: true, stream_options: { include_usage: true }, ...options };
  if ($("model").value) body.model = $("model").value;
  const fields = { temperature: ["temperature"], top_p: ["top-p"], max_tokens: ["max-tokens", true], seed: ["seed", true] };
  for (const [name, [id, integer]] of Object.entries(fields)) {
    const value = numberField(id, integer);
    if (value !== undefined) body[name] = value;
  }
  const stop = stopSequences();
  if (stop.length) body.stop = stop;
  return body;
}

let modelsTimer = null;
async function loadModels() {
  const select = $("model");
  const previous = select.value || localStorage.getItem(KEY_STORAGE + ".model") || "";
  try {
    const ids = (await getJSON("v1/models")).data.map((m) => m.id);
    select.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(previous)) select.value = previous;
    $("model-status").textContent = "";
  } catch (err) {
    select.replaceChildren(new Option("(server default)", ""));
    $("model-status").textContent = "Could not list models: " + err.message;
  }
}

// --- Chat ----------------------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

const EMPTY = '<p class="empty">No messages yet. Type a prompt below.</p>';

function addBubble(role, text) {
  $("messages").querySelector(".empty")?.remove();
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  div.append(who, content);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("cancel").disabled = !busy;
  $("clear").disabled = busy;
}

// Reads an SSE body and calls onData(payload) for each `data:` line; comments (`: keep-alive`) are skipped.
async function readSSE(body, onData) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop();   // an incomplete line waits for the next read
      for (const line of lines.map((l) => l.replace(/\r$/, ""))) {
        if (!line.startsWith("data:")) continue;   // blank separators, comments, other fields
        const data = line.slice(5).trimStart();
        if (data === "[DONE]") return true;
        onData(JSON.parse(data));
      }
    }
  } finally {
    reader.cancel().catch(() => {});   // on an error or an early return, stop reading the body
  }
}

// --- Logprobs: the answer as token spans -----------------------------------------------------------

function percent(logprob) {
  if (typeof logprob !== "number" || !Number.isFinite(logprob)) return "–";
  const p = Math.exp(logprob) * 100;
  return (p >= 10 ? p.toFixed(1) : p >= 0.01 ? p.toPrecision(2) : p.toExponential(1)) + "%";
}

// A token's text in quotes, its whitespace control characters made visible (a partial character is already
// "bytes:\xNN" from the server).
function quoted(token) {
  const escapes = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };
  return '"' + String(token).replace(/[\n\r\t]/g, (c) => escapes[c]) + '"';
}

function describeToken(entry) {
  const lines = [`${quoted(entry.token)}  ${percent(entry.logprob)}  (logprob ${Number(entry.logprob).toFixed(4)})`];
  const top = entry.top_logprobs || [];
  if (top.length) {
    lines.push(`Top ${top.length}:`);
    for (const alt of top) lines.push(`  ${quoted(alt.token)}  ${percent(alt.logprob)}`);
  }
  return lines.join("\n");
}

function commonPrefix(a, b) {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return a.slice(0, i);
}

// Renders a streamed answer as one span per token (or per run of byte tokens that make one character), whose
// title gives the token's probability and its top alternatives. The text shown is always the answer's text:
// a token's bytes are matched against it (the first token's leading space is not in the text; text held back
// for a possible stop sequence comes with a later delta; tokens past a stop sequence add nothing), and any
// text no token is matched to is shown plain.
class TokenRenderer {
  constructor(content) {
    this.content = content;
    this.decoder = new TextDecoder("utf-8");  // streaming: a partial character waits for its last byte
    this.pending = [];    // tokens whose text is not complete yet (part of a character)
    this.shown = 0;       // characters of the answer shown so far
    this.lastSpan = null;
    this.owed = "";       // the rest of lastSpan's token text, not in the answer yet (held back)
  }

  // entries: one delta's logprobs.content; answer: the whole answer so far, this delta's text included.
  add(entries, answer) {
    for (const entry of entries) {
      this.settleOwed(answer);
      this.pending.push(entry);
      this.place(this.decoder.decode(new Uint8Array(entry.bytes || []), { stream: true }), answer);
    }
    this.settleOwed(answer);
    this.showRest(answer);
  }

  // At the end of the stream: dangling bytes decode to U+FFFD, as on the server.
  finish(answer) {
    if (this.pending.length) this.place(this.decoder.decode(), answer);
    this.showRest(answer);
  }

  place(piece, answer) {
    if (!piece) return;  // part of a character: its span comes with the character's last byte
    const rest = answer.slice(this.shown);
    const candidate = this.shown === 0 && piece.startsWith(" ") && !rest.startsWith(" ") ? piece.slice(1) : piece;
    const text = commonPrefix(candidate, rest);
    const tokens = this.pending;
    this.pending = [];
    if (!text) return;   // nothing of it in the answer
    const span = document.createElement("span");
    span.className = "tok " + probabilityClass(tokens[tokens.length - 1].logprob);
    span.textContent = text;
    span.title = tokens.map(describeToken).join("\n\n");
    this.content.append(span);
    this.shown += text.length;
    this.lastSpan = span;
    this.owed = candidate.slice(text.length);
  }

  settleOwed(answer) {
    if (!this.owed) return;
    const rest = answer.slice(this.shown);
    if (!rest) return;  // still held back
    const text = commonPrefix(this.owed, rest);
    this.lastSpan.textContent += text;
    this.shown += text.length;
    this.owed = text ? this.owed.slice(text.length) : "";
  }

  showRest(answer) {
    if (answer.length > this.shown && !this.owed) {
      this.content.append(document.createTextNode(answer.slice(this.shown)));
      this.shown = answer.length;
    }
  }
}

function probabilityClass(logprob) {
  const p = Math.exp(logprob);
  return p >= 0.9 ? "p-high" : p >= 0.5 ? "p-mid" : p >= 0.1 ? "p-low" : "p-rare";
}

// --- Sending -------------------------------------------------------------------------------------

async function send() {
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  let options;
  try {
    options = outputOptions();
  } catch (err) {
    showError(err.message);
    return;
  }
  showError("");
  history.push({ role: "user", content: text });
  const userBubble = addBubble("user", text);
  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  const content = bubble.querySelector(".content");
  const tokens = options.logprobs ? new TokenRenderer(content) : null;
  if (tokens) bubble.classList.add("logprobs");
  $("prompt").value = "";
  $("usage").textContent = "Usage: –";
  $("timings").textContent = "Timings: waiting…";
  controller = new AbortController();
  setBusy(true);

  const start = performance.now();
  let firstToken = null;
  let usage = null;
  let answer = "";
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(requestBody(options)), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorOf(response));
    const finished = await readSSE(response.body, (chunk) => {
      if (chunk.error) {
        const e = chunk.error;
        throw new Error("Error during the stream: " + (e.message || JSON.stringify(e)) + (e.code ? ` [${e.code}]` : ""));
      }
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      const delta = choice && choice.delta;
      const entries = (tokens && choice && choice.logprobs && choice.logprobs.content) || [];
      if ((delta && delta.content) || entries.length) {
        if (firstToken === null) firstToken = performance.now();
        answer += (delta && delta.content) || "";
        if (tokens) tokens.add(entries, answer);
        else content.textContent = answer;
        bubble.scrollIntoView({ block: "end" });
      }
    });
    if (!finished) throw new Error("The stream ended without [DONE].");
    if (tokens) tokens.finish(answer);
    history.push({ role: "assistant", content: answer });
    bubble.classList.remove("streaming");
    showStats(usage, start, firstToken, performance.now());
  } catch (err) {
    // The turn failed: take it out of the conversation so that it stays user/assistant alternating.
    history.pop();
    userBubble.remove();
    bubble.remove();
    if (!history.length) $("messages").innerHTML = EMPTY;
    $("prompt").value = text;
    $("timings").textContent = "Timings: –";
    showError(err.name === "AbortError" ? "Stopped: the request was cancelled." : err.message);
  } finally {
    controller = null;
    setBusy(false);
  }
}

function showStats(usage, start, firstToken, end) {
  if (usage) {
    $("usage").textContent = `Usage: prompt tokens: ${usage.prompt_tokens} · completion tokens: ` +
      `${usage.completion_tokens} · total tokens: ${usage.total_tokens}`;
  }
  const total = (end - start) / 1000;
  const ttft = firstToken === null ? "–" : `${Math.round(firstToken - start)} ms`;
  const rate = usage && total > 0 ? (usage.completion_tokens / total).toFixed(1) : "–";
  $("timings").textContent = `Timings: time to first token: ${ttft} · total: ${total.toFixed(2)} s · ${rate} tokens/s`;
}

function clearConversation() {
  history = [];
  $("messages").innerHTML = EMPTY;
  $("usage").textContent = "Usage: –";
  $("timings").textContent = "Timings: –";
  showError("");
}

// --- Jobs and batches ----------------------------------------------------------------------------

function fmtTime(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

function table(columns, rows) {
  const t = document.createElement("table");
  const head = t.createTHead().insertRow();
  for (const c of columns) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = c;
    head.append(th);
  }
  const tbody = t.createTBody();
  for (const row of rows) {
    const tr = tbody.insertRow();
    row.forEach((cell, i) => {
      const td = tr.insertCell();
      td.textContent = cell ?? "–";
      if (columns[i] === "Status") td.className = "status status-" + cell;
    });
  }
  return t;
}

async function loadList(path, target, columns, toRow, noun) {
  const el = $(target);
  try {
    const list = await getJSON(path);
    const rows = (list.data || []).map(toRow);
    if (!rows.length) {
      el.innerHTML = `<p class="hint">No ${noun} for this key.</p>`;
      return;
    }
    el.replaceChildren(table(columns, rows));
    if (list.has_more) el.insertAdjacentHTML("beforeend", '<p class="hint">More exist; only the latest 20 are shown.</p>');
  } catch (err) {
    el.replaceChildren(Object.assign(document.createElement("p"), { className: "unavailable", textContent: "Not available: " + err.message }));
  }
}

async function refreshJobs() {
  $("jobs-refresh").disabled = true;
  await Promise.all([
    loadList("v1/chat/completions?limit=20", "jobs-list", ["ID", "Status", "Model", "Created", "Completed", "Error"],
      (j) => [j.id, j.status, j.model, fmtTime(j.created_at), fmtTime(j.completed_at), j.error && (j.error.message || JSON.stringify(j.error))], "jobs"),
    loadList("v1/batches?limit=20", "batches-list", ["ID", "Status", "Created", "Completed", "Requests (done / failed / total)"],
      (b) => { const c = b.request_counts || {}; return [b.id, b.status, fmtTime(b.created_at), fmtTime(b.completed_at), `${c.completed ?? "–"} / ${c.failed ?? "–"} / ${c.total ?? "–"}`]; }, "batches"),
  ]);
  $("jobs-updated").textContent = "Updated " + new Date().toLocaleTimeString();
  $("jobs-refresh").disabled = false;
}

// --- Tabs and wiring -----------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of ["chat", "jobs"]) {
    const selected = tab === name;
    $("tab-" + tab).setAttribute("aria-selected", String(selected));
    $("tab-" + tab).tabIndex = selected ? 0 : -1;
    $("panel-" + tab).hidden = !selected;
  }
  if (name === "jobs") refreshJobs();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("input", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    clearTimeout(modelsTimer);
    modelsTimer = setTimeout(loadModels, 300);
  });
  $("model").addEventListener("change", () => localStorage.setItem(KEY_STORAGE + ".model", $("model").value));
  $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("cancel").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", clearConversation);
  $("response-format").addEventListener("change", updateSwitches);
  $("logprobs").addEventListener("change", updateSwitches);
  $("schema").addEventListener("input", checkSchema);
  updateSwitches();
  $("jobs-refresh").addEventListener("click", refreshJobs);
  $("tab-chat").addEventListener("click", () => selectTab("chat"));
  $("tab-jobs").addEventListener("click", () => selectTab("jobs"));
  document.querySelector("[role=tablist]").addEventListener("keydown", (e) => {
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
    const next = $("tab-chat").getAttribute("aria-selected") === "true" ? "jobs" : "chat";
    selectTab(next);
    $("tab-" + next).focus();
  });
  loadModels();
});
