// FastServe dashboard: a single page over the gateway's /ui/api routes and its OpenAI routes.
// Plain modules, no build step. Every text that comes from the server goes into the DOM through
// textContent (or SVG text nodes), never innerHTML, so names and messages cannot inject markup.

const TOKEN_KEY = "fastserve-token";
const JOB_STATES = ["QUEUED", "RUNNING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELLED"];
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
const JOB_KINDS = ["preprocessing", "training", "optimization"];
const ARTIFACT_KINDS = ["corpora", "datasets", "tokenizers", "checkpoints", "models", "reports"];
// Lineage columns, left to right; singular names too, in case a registry node says "corpus".
const LAYER = {
  corpora: 0, corpus: 0, datasets: 1, dataset: 1, tokenizers: 1, tokenizer: 1,
  checkpoints: 2, checkpoint: 2, models: 3, model: 3, reports: 4, report: 4,
};
// The gateway's bounds (openai_schema.py): temperature in [0, 100], top_p in (0, 1], max_tokens in [1, 8192].
const SAMPLING = {
  temperature: { min: 0, max: 100, step: 0.1, value: 0.7 },
  topP: { min: 0.01, max: 1, step: 0.01, value: 1 },
  maxTokens: { min: 1, max: 8192, step: 1, value: 256 },
};

// ---------------------------------------------------------------------------------------------
// DOM helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") el.textContent = value;
    else if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "text") el.textContent = value;
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function setText(el, text) {
  const value = text ?? "—";
  if (el.textContent !== value) el.textContent = value;
}

function errorState(message) {
  return h("div", { class: "error-state", role: "alert", text: message });
}

function emptyState(message) {
  return h("p", { class: "empty-state", text: message });
}

// A slot that shows one error message or nothing; changing only when the text changes, so that a
// list refreshed every few seconds does not make screen readers repeat the same alert.
function alertSlot() {
  // The .error-state element exists only while there is an error, so that "no .error-state" means none.
  const el = h("div", { class: "alert-slot" });
  return {
    el,
    show(message) {
      if (!message) { this.clear(); return; }
      const shown = el.firstElementChild;
      if (shown) { if (shown.textContent !== message) shown.textContent = message; } else el.append(errorState(message));
    },
    clear() { el.replaceChildren(); },
  };
}

// Rows that open something: focusable, Enter or click.
function activatable(el, action) {
  el.tabIndex = 0;
  el.addEventListener("click", action);
  el.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || (event.key === " " && el.tagName !== "TR")) {
      event.preventDefault();
      action();
    }
  });
  return el;
}

function tableWrap(table, label) {
  return h("div", { class: "table-wrap", role: "region", "aria-label": label, tabindex: 0 }, table);
}

function tableHead(labels) {
  return h("thead", {}, h("tr", {}, labels.map((t) => h("th", { scope: "col", text: t }))));
}

// A list page's table and its empty-state message: the table shows when there are rows, the message
// when there are none, neither after an error (the page's alert says why). Both start hidden.
function tableView(table, label, emptyText = "") {
  const wrap = tableWrap(table, label);
  const empty = emptyState(emptyText);
  wrap.hidden = true;
  empty.hidden = true;
  return {
    wrap, empty,
    show(count, text) {
      wrap.hidden = !count;
      empty.hidden = Boolean(count);
      if (text !== undefined) setText(empty, text);
    },
    hide() { wrap.hidden = true; empty.hidden = true; },
  };
}

// Children of `parent` kept in the order of `items` and updated in place, matched by key (the
// children's data-<keyAttr>), so that a refresh keeps the keyboard focus where it was.
// `create(item, key)` makes a missing child; `update(el, item)` fills in a new or kept one.
function syncChildren(parent, items, { keyOf, create, update, keyAttr = "key" }) {
  const existing = new Map([...parent.children].map((el) => [el.dataset[keyAttr], el]));
  items.forEach((item, index) => {
    const key = keyOf(item);
    const el = existing.get(key) ?? create(item, key);
    existing.delete(key);
    update(el, item);
    if (parent.children[index] !== el) parent.insertBefore(el, parent.children[index] || null);
  });
  for (const el of existing.values()) el.remove();
}

// ---------------------------------------------------------------------------------------------
// Formatting: null and undefined read "—" everywhere.

function isNum(v) { return typeof v === "number" && Number.isFinite(v); }
function fmtNum(v, digits = 1) { return isNum(v) ? v.toFixed(digits) : "—"; }
function fmtMs(v) { return isNum(v) ? `${v.toFixed(0)} ms` : "—"; }
function fmtPct(v) { return isNum(v) ? `${(v * 100).toFixed(0)}%` : "—"; }
function fmtTps(v) { return isNum(v) ? `${v.toFixed(1)} tok/s` : "—"; }
function fmtLoss(v) { return isNum(v) ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4)) : "—"; }

// Axis ticks: learning rates are around 1e-4, where uPlot's default ticks all read "0".
function fmtAxis(v) {
  if (!isNum(v)) return "";
  if (v === 0) return "0";
  if (Math.abs(v) < 0.01 || Math.abs(v) >= 1e6) return v.toExponential(1);
  return String(Number(v.toPrecision(3)));
}

function fmtDuration(seconds) {
  if (!isNum(seconds) || seconds < 0) return "—";
  const total = Math.round(seconds);
  const hrs = Math.floor(total / 3600);
  const min = Math.floor((total % 3600) / 60);
  const sec = total % 60;
  if (hrs) return `${hrs}h ${String(min).padStart(2, "0")}m`;
  if (min) return `${min}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

function fmtTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function fmtBytes(n) {
  if (!isNum(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function fmtQueue(levels) {
  if (!levels || typeof levels !== "object") return "—";
  const keys = Object.keys(levels).sort((a, b) => Number(a) - Number(b));
  if (!keys.length) return "—";
  return keys.map((k) => `L${k}: ${levels[k] ?? "—"}`).join(" · ");
}

function fmtValue(v, unit) {
  if (v === null || v === undefined) return "—";
  if (isNum(v)) {
    const text = Number.isInteger(v) ? String(v) : (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4));
    return unit ? `${text} ${unit}` : text;
  }
  return String(v);
}

// ---------------------------------------------------------------------------------------------
// Token and fetch: every call carries the session's token; a 401 asks for one and retries.

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let tokenPrompt = null;

function currentToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
}

function askToken(refused) {
  if (tokenPrompt) return tokenPrompt;
  const dialog = document.getElementById("token-dialog");
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const error = document.getElementById("token-error");
  const cancel = document.getElementById("token-cancel");
  error.hidden = !refused;
  error.textContent = refused ? "That token was refused. Check it and try again." : "";
  input.value = "";
  tokenPrompt = new Promise((resolve) => {
    const done = (token) => {
      form.removeEventListener("submit", onSubmit);
      cancel.removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onEscape);
      if (dialog.open) dialog.close();
      tokenPrompt = null;
      resolve(token);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) { input.focus(); return; }
      try { sessionStorage.setItem(TOKEN_KEY, token); } catch { /* storage off: keep it for this call */ }
      done(token);
    };
    const onCancel = () => done(null);
    const onEscape = (event) => { event.preventDefault(); done(null); };
    form.addEventListener("submit", onSubmit);
    cancel.addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onEscape);
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
  return tokenPrompt;
}

// fetch with the token; the Response is returned whatever its status, but for 401, which asks for a
// token and tries again. A body must be a string so it can be sent twice.
async function authFetch(path, init = {}) {
  for (;;) {
    const token = currentToken();
    const headers = new Headers(init.headers || {});
    if (token) headers.set("Authorization", `Bearer ${token}`);
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    response.body?.cancel().catch(() => {});
    if (currentToken() !== token) continue; // someone entered a new token while this call was out
    const entered = await askToken(Boolean(token));
    if (entered === null) throw new ApiError(401, "A token is needed to use this gateway. Reload the page to enter one.");
  }
}

async function errorMessage(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
    else if (typeof body?.detail === "string") message = body.detail;
  } catch { /* not JSON: keep the status line */ }
  return message;
}

async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await authFetch(path, init);
  } catch (err) {
    if (err instanceof ApiError || err.name === "AbortError") throw err;
    throw new ApiError(0, "The gateway cannot be reached.");
  }
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response.json();
}

function messageOf(err) {
  return err instanceof Error ? err.message : String(err);
}

function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value) query.set(key, value);
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

// ---------------------------------------------------------------------------------------------
// Server-sent events over fetch (EventSource cannot send the Authorization header).

// Calls onMessage({id, event, data}) for each message of the response's body; resolves when it ends.
async function readSSE(response, onMessage) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let message = { id: null, event: "message", data: [] };
  const line = (text) => {
    if (text === "") {
      if (message.data.length) onMessage({ id: message.id, event: message.event, data: message.data.join("\n") });
      message = { id: null, event: "message", data: [] };
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") message.data.push(value);
    else if (field === "event") message.event = value || "message";
    else if (field === "id" && !value.includes("\0")) message.id = value;
  };
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    // Lines end with \n, \r\n or \r; a trailing \r may be half of a \r\n, so it waits for more.
    let match;
    const eol = /\r\n|\n|\r(?!$)/g;
    let start = 0;
    while ((match = eol.exec(buffer)) !== null) {
      line(buffer.slice(start, match.index));
      start = match.index + match[0].length;
    }
    buffer = buffer.slice(start);
    if (done) {
      if (buffer.endsWith("\r")) { line(buffer.slice(0, -1)); buffer = ""; }
      return;
    }
  }
}

// Follows a job's events until its `end` message, reconnecting after a dropped stream from the last
// event id seen. Stops when `signal` aborts.
async function watchJob(service, jobId, { onEvent, onEnd, onStatus, signal }) {
  let lastId = null;
  let delay = 500;
  const base = `/ui/api/jobs/${encodeURIComponent(service)}/${encodeURIComponent(jobId)}/events`;
  while (!signal.aborted) {
    let ended = false;
    let streamError = null;
    try {
      const response = await authFetch(withQuery(base, { after: lastId }), {
        signal, headers: { Accept: "text/event-stream" },
      });
      if (!response.ok) {
        const message = await errorMessage(response);
        // A job or service that is not there will not appear by trying again; a 503 may recover.
        if (response.status !== 503) { onStatus({ error: message, final: true }); return; }
        onStatus({ error: message });
      } else {
        onStatus({ live: true });
        await readSSE(response, (msg) => {
          if (msg.id !== null) { lastId = msg.id; delay = 500; }
          let data;
          try { data = JSON.parse(msg.data); } catch { return; }
          if (msg.event === "end") { ended = true; onEnd(data); }
          else if (msg.event === "error") streamError = data?.error?.message || "the job's event stream failed";
          else onEvent(data);
        });
        // The gateway ends a watch that failed upstream with an `error` message; it is tried again.
        if (streamError) onStatus({ error: `${streamError}; trying again…` });
      }
    } catch (err) {
      if (signal.aborted || err.name === "AbortError") return;
      if (err instanceof ApiError) { onStatus({ error: err.message, final: true }); return; }
      onStatus({ error: "The event stream was interrupted; reconnecting…" });
    }
    if (ended || signal.aborted) return;
    onStatus({ live: false });
    await abortableWait(delay, signal);
    delay = Math.min(delay * 2, 10000);
  }
}

function abortableWait(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// ---------------------------------------------------------------------------------------------
// Pages share one lifecycle: render(main, params, ctx) fills the page; ctx collects timers and
// aborters that end when the route changes.

class PageContext {
  constructor() {
    this.controller = new AbortController();
    this.timers = [];
    this.cleanups = [];
  }
  get signal() { return this.controller.signal; }
  get alive() { return !this.controller.signal.aborted; }
  // Runs fn now and then every ms, never two at once.
  every(ms, fn) {
    let running = false;
    const tick = async () => {
      if (running || !this.alive) return;
      running = true;
      try { await fn(); } finally { running = false; }
    };
    tick();
    this.timers.push(setInterval(tick, ms));
  }
  onClose(fn) { this.cleanups.push(fn); }
  close() {
    this.controller.abort();
    this.timers.forEach(clearInterval);
    this.cleanups.forEach((fn) => { try { fn(); } catch { /* leaving anyway */ } });
  }
}

// Yes/no through #confirm-dialog.
function confirmAction(title, text, yesLabel) {
  const dialog = document.getElementById("confirm-dialog");
  const yes = document.getElementById("confirm-yes");
  const no = document.getElementById("confirm-no");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  yes.textContent = yesLabel;
  const opener = document.activeElement;
  return new Promise((resolve) => {
    const done = (answer) => {
      yes.removeEventListener("click", onYes);
      no.removeEventListener("click", onNo);
      dialog.removeEventListener("cancel", onEscape);
      if (dialog.open) dialog.close();
      if (opener && opener.isConnected) opener.focus();
      resolve(answer);
    };
    const onYes = () => done(true);
    const onNo = () => done(false);
    const onEscape = (event) => { event.preventDefault(); done(false); };
    yes.addEventListener("click", onYes);
    no.addEventListener("click", onNo);
    dialog.addEventListener("cancel", onEscape);
    dialog.showModal();
    no.focus();
  });
}

// ---------------------------------------------------------------------------------------------
// Jobs

const jobFilters = { state: "", kind: "" };

function jobsPage(main, _params, ctx) {
  const heading = h("h1", { tabindex: -1, text: "Jobs" });
  const stateSelect = h("select", { id: "filter-state" },
    h("option", { value: "", text: "All states" }),
    JOB_STATES.map((st) => h("option", { value: st, text: st.toLowerCase() })));
  const kindSelect = h("select", { id: "filter-kind" },
    h("option", { value: "", text: "All kinds" }),
    JOB_KINDS.map((k) => h("option", { value: k, text: k })));
  stateSelect.value = jobFilters.state;
  kindSelect.value = jobFilters.kind;

  const alerts = alertSlot();
  const partial = alertSlot();
  const tbody = h("tbody");
  const table = h("table", { id: "jobs-table" },
    h("caption", { class: "visually-hidden", text: "Jobs, newest first" }),
    tableHead(["Job", "Service", "Type", "State", "Progress", "Message", "Created", "Updated"]),
    tbody);
  const view = tableView(table, "Jobs");

  append(main, [
    heading,
    h("form", { class: "filters", onsubmit: (e) => e.preventDefault() },
      h("div", { class: "field" }, h("label", { for: "filter-state", text: "State" }), stateSelect),
      h("div", { class: "field" }, h("label", { for: "filter-kind", text: "Kind" }), kindSelect)),
    alerts.el, partial.el, view.wrap, view.empty,
  ]);

  let generation = 0;
  const load = async () => {
    const mine = ++generation;
    try {
      const data = await api(withQuery("/ui/api/jobs", jobFilters), { signal: ctx.signal });
      if (mine !== generation || !ctx.alive) return;
      alerts.clear();
      const errs = (data.errors || []).map((e) => e.message || `${e.service} unavailable`);
      partial.show(errs.join(" · "));
      const jobs = data.jobs || [];
      renderJobRows(tbody, jobs);
      view.show(jobs.length, jobFilters.state || jobFilters.kind ? "No jobs match these filters." : "No jobs yet.");
    } catch (err) {
      if (err.name === "AbortError" || mine !== generation) return;
      alerts.show(`Could not load the jobs: ${messageOf(err)}`);
      partial.clear();
      view.hide();
    }
  };
  const onFilter = () => {
    jobFilters.state = stateSelect.value;
    jobFilters.kind = kindSelect.value;
    load();
  };
  stateSelect.addEventListener("change", onFilter);
  kindSelect.addEventListener("change", onFilter);
  ctx.every(3000, load);
}

function renderJobRows(tbody, jobs) {
  syncChildren(tbody, jobs, { keyOf: (job) => `${job.service}/${job.job_id}`, create: jobRow, update: fillJobRow });
}

function jobRow(job, key) {
  const row = h("tr", { "data-job-id": job.job_id, "data-service": job.service, "data-key": key },
    h("td", { class: "job-id mono" }), h("td", { class: "job-service" }), h("td", { class: "job-type" }),
    h("td", {}, h("span", { class: "job-state badge" })),
    h("td", { class: "job-progress" }, h("progress", { max: 1, value: 0 }), h("span", { class: "pct" })),
    h("td", { class: "job-message" }), h("td", { class: "job-created" }), h("td", { class: "job-updated" }));
  activatable(row, () => { location.hash = `#/jobs/${encodeURIComponent(job.service)}/${encodeURIComponent(job.job_id)}`; });
  row.setAttribute("aria-label", `Open job ${job.job_id}`);
  return row;
}

function fillJobRow(row, job) {
  setText(row.querySelector(".job-id"), job.job_id);
  setText(row.querySelector(".job-service"), job.service);
  setText(row.querySelector(".job-type"), job.job_type || "—");
  const badge = row.querySelector(".job-state");
  setText(badge, job.state);
  badge.dataset.state = job.state;
  const bar = row.querySelector("progress");
  bar.value = isNum(job.progress) ? job.progress : 0;
  bar.setAttribute("aria-label", `Progress of job ${job.job_id}`);
  setText(row.querySelector(".pct"), fmtPct(job.progress));
  setText(row.querySelector(".job-message"), job.error || job.message || "—");
  setText(row.querySelector(".job-created"), fmtTime(job.create_time));
  setText(row.querySelector(".job-updated"), fmtTime(job.update_time));
}

// A line chart in a <figure data-points=N>, created at its first point and redrawn at most once a frame.
function lineChart(figure, series) {
  const holder = h("div", { class: "chart" });
  const empty = emptyState("No points yet.");
  holder.append(empty);
  figure.append(holder);
  figure.dataset.points = "0";
  const data = [[], ...series.map(() => [])];
  let plot = null;
  let pending = false;
  let destroyed = false;
  const width = () => Math.max(240, holder.clientWidth || figure.clientWidth || 320);
  const draw = () => {
    pending = false;
    // A frame asked for just before the page was left would build a plot nobody destroys.
    if (destroyed) return;
    if (!plot) {
      if (typeof window.uPlot !== "function") return;
      empty.remove();
      plot = new window.uPlot({
        width: width(), height: 200,
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { size: 64, values: (_u, splits) => splits.map(fmtAxis) }],
        legend: { live: true },
        series: [{ label: "step" }, ...series.map((sr) => ({ label: sr.label, stroke: sr.color, width: 2,
          spanGaps: true, value: (_u, v) => (v === null || v === undefined ? "—" : fmtLoss(v)) }))],
      }, data, holder);
    } else {
      plot.setData(data);
    }
    figure.dataset.points = String(data[0].length);
  };
  const resize = new ResizeObserver(() => { if (plot) plot.setSize({ width: width(), height: 200 }); });
  resize.observe(holder);
  return {
    add(x, values) {
      // Steps arrive in order, so a new one goes at the end without a search; a repeated step (after a
      // reconnect) replaces its point, and one older than the last is slotted in where it belongs.
      const n = data[0].length;
      const at = n && x <= data[0][n - 1] ? data[0].findIndex((v) => v >= x) : n;
      if (data[0][at] === x) values.forEach((v, i) => { if (isNum(v)) data[i + 1][at] = v; });
      else { data[0].splice(at, 0, x); values.forEach((v, i) => data[i + 1].splice(at, 0, isNum(v) ? v : null)); }
      if (!pending) { pending = true; requestAnimationFrame(draw); }
    },
    destroy() { destroyed = true; resize.disconnect(); if (plot) plot.destroy(); },
  };
}

function jobDetailPage(main, params, ctx) {
  const { service, jobId } = params;
  const back = h("a", { href: "#/jobs", class: "back", text: "← All jobs" });
  const heading = h("h1", { tabindex: -1 }, "Job ", h("span", { class: "mono", text: jobId }));
  const alerts = alertSlot();
  const streamNote = h("p", { class: "stream-note", role: "status" });
  append(main, [back, heading, alerts.el]);

  const detail = h("section", { id: "job-detail", "data-job-id": jobId, "data-service": service, "aria-labelledby": "job-detail-title" });
  detail.hidden = true;
  main.append(detail);

  const stateEl = h("span", { id: "job-state", class: "badge" });
  const progress = h("progress", { id: "job-progress", max: 1, value: 0, "aria-label": "Job progress" });
  const pct = h("span", { class: "pct" });
  const messageEl = h("span", { id: "job-message" });
  const tpsEl = h("span", { id: "job-tps", text: "—" });
  const etaEl = h("span", { id: "job-eta", text: "—" });
  const jobError = alertSlot();
  const cancel = h("button", { id: "cancel-job", type: "button", class: "danger", text: "Cancel job" });
  const times = { create: h("span"), start: h("span"), end: h("span") };
  const typeEl = h("span");
  const params_ = h("pre", { class: "json" });
  const result = h("pre", { class: "json" });
  const logList = h("ol", { class: "log", "aria-label": "Job log" });

  append(detail, [
    h("h2", { id: "job-detail-title", class: "visually-hidden", text: "Job details" }),
    h("div", { class: "job-head" },
      h("dl", { class: "facts", "aria-live": "polite" },
        h("div", {}, h("dt", { text: "State" }), h("dd", {}, stateEl)),
        h("div", {}, h("dt", { text: "Progress" }), h("dd", {}, progress, pct)),
        h("div", {}, h("dt", { text: "Tokens/s" }), h("dd", {}, tpsEl)),
        h("div", {}, h("dt", { text: "ETA" }), h("dd", {}, etaEl)),
        h("div", { class: "wide" }, h("dt", { text: "Message" }), h("dd", {}, messageEl))),
      h("dl", { class: "facts small" },
        h("div", {}, h("dt", { text: "Service" }), h("dd", { text: service })),
        h("div", {}, h("dt", { text: "Type" }), h("dd", {}, typeEl)),
        h("div", {}, h("dt", { text: "Created" }), h("dd", {}, times.create)),
        h("div", {}, h("dt", { text: "Started" }), h("dd", {}, times.start)),
        h("div", {}, h("dt", { text: "Ended" }), h("dd", {}, times.end))),
      h("div", { class: "actions" }, cancel)),
    jobError.el, streamNote,
  ]);

  let charts = null;
  if (service === "training") {
    const lossFig = h("figure", { id: "loss-chart" }, h("figcaption", { text: "Training loss" }));
    const lrFig = h("figure", { id: "lr-chart" }, h("figcaption", { text: "Learning rate" }));
    const evalFig = h("figure", { id: "eval-chart" }, h("figcaption", { text: "Evaluation loss" }));
    detail.append(h("section", { class: "charts", "aria-label": "Training curves" }, lossFig, lrFig, evalFig));
    charts = {
      loss: lineChart(lossFig, [{ label: "loss", color: "#2563eb" }]),
      lr: lineChart(lrFig, [{ label: "learning rate", color: "#9333ea" }]),
      eval: lineChart(evalFig, [{ label: "eval loss", color: "#dc2626" }]),
    };
    ctx.onClose(() => Object.values(charts).forEach((c) => c.destroy()));
  }
  const evalExtra = h("p", { class: "eval-extra", hidden: true });
  if (charts) detail.append(evalExtra);

  let reportBox = null;
  if (service === "optimization") {
    reportBox = h("section", { class: "report", "aria-labelledby": "report-title" },
      h("h2", { id: "report-title", text: "Before and after" }));
    detail.append(reportBox);
  }

  detail.append(
    h("details", { class: "params" }, h("summary", { text: "Parameters" }), params_),
    h("details", { class: "params" }, h("summary", { text: "Result" }), result),
    h("section", { class: "log-box", "aria-labelledby": "log-title" }, h("h2", { id: "log-title", text: "Log" }), logList),
  );

  let job = null;
  const showJob = (j) => {
    job = j;
    detail.hidden = false;
    setText(stateEl, j.state);
    stateEl.dataset.state = j.state;
    if (isNum(j.progress)) { progress.value = j.progress; setText(pct, fmtPct(j.progress)); }
    setText(messageEl, j.message || "—");
    setText(typeEl, j.job_type || "—");
    setText(times.create, fmtTime(j.create_time));
    setText(times.start, fmtTime(j.start_time));
    setText(times.end, fmtTime(j.end_time));
    jobError.show(j.error ? `The job failed: ${j.error}` : "");
    cancel.hidden = TERMINAL.has(j.state) || j.state === "CANCELLING" || Boolean(j.cancel_requested);
    params_.textContent = JSON.stringify(j.params ?? {}, null, 2);
    result.textContent = JSON.stringify(j.result ?? {}, null, 2);
  };

  const addLog = (text, time) => {
    const item = h("li", {}, h("time", { text: time ? new Date(time).toLocaleTimeString() : "" }), " ", text);
    logList.append(item);
    while (logList.children.length > 300) logList.firstElementChild.remove();
  };

  const onEvent = (ev) => {
    if (!job) return;
    if (ev.state) { job.state = ev.state; }
    if (isNum(ev.progress) && ev.progress > 0) job.progress = ev.progress;
    if (ev.message && ev.type !== "LOG") job.message = ev.message;
    if (ev.type === "LOG" && ev.message) addLog(ev.message, ev.time);
    if (ev.type === "STATE" && ev.state) addLog(`state → ${ev.state}${ev.message ? `: ${ev.message}` : ""}`, ev.time);
    if (ev.type === "ARTIFACT") addLog(`artifact ${ev.data?.uri ?? ev.message ?? ""}`, ev.time);
    if (ev.type === "METRICS" && ev.data) onMetrics(ev.data);
    showJob(job);
  };

  const onMetrics = (m) => {
    if (isNum(m.tokens_per_second)) setText(tpsEl, fmtTps(m.tokens_per_second));
    if (m.eta_seconds !== undefined) setText(etaEl, fmtDuration(m.eta_seconds));
    if (!charts) return;
    const step = isNum(m.step) ? m.step : null;
    if (step === null) return;
    if (isNum(m.eval_loss)) {
      charts.eval.add(step, [m.eval_loss]);
      const extra = [];
      if (isNum(m.perplexity)) extra.push(`perplexity ${fmtNum(m.perplexity, 2)}`);
      if (isNum(m.eval_accuracy)) extra.push(`accuracy ${fmtPct(m.eval_accuracy)}`);
      evalExtra.hidden = !extra.length;
      evalExtra.textContent = extra.length ? `Last evaluation (step ${step}): ${extra.join(", ")}` : "";
    }
    if (isNum(m.loss)) charts.loss.add(step, [m.loss]);
    if (isNum(m.learning_rate)) charts.lr.add(step, [m.learning_rate]);
  };

  let reportLoaded = false;
  const loadReport = async () => {
    if (!reportBox || reportLoaded) return;
    const slot = reportBox.querySelector(".report-body") || h("div", { class: "report-body" });
    reportBox.append(slot);
    try {
      const report = await api(`/ui/api/jobs/optimization/${encodeURIComponent(jobId)}/report`, { signal: ctx.signal });
      reportLoaded = true;
      slot.replaceChildren(reportTable(report.rows || []));
    } catch (err) {
      if (err.name === "AbortError") return;
      if (err.status === 404) {
        slot.replaceChildren(emptyState(job && TERMINAL.has(job.state)
          ? "This job left no report." : "The report appears when the job has finished."));
      } else slot.replaceChildren(errorState(`Could not load the report: ${messageOf(err)}`));
    }
  };

  cancel.addEventListener("click", async () => {
    const yes = await confirmAction("Cancel this job?",
      `Job ${jobId} (${service}) stops at its next safe point. This cannot be undone.`, "Cancel job");
    if (!yes || !ctx.alive) return;
    cancel.disabled = true;
    try {
      const updated = await api(`/ui/api/jobs/${encodeURIComponent(service)}/${encodeURIComponent(jobId)}/cancel`,
        { method: "POST", signal: ctx.signal });
      showJob(updated);
      alerts.clear();
    } catch (err) {
      if (err.name !== "AbortError") alerts.show(`Could not cancel the job: ${messageOf(err)}`);
    } finally {
      cancel.disabled = false;
    }
  });

  (async () => {
    try {
      showJob(await api(`/ui/api/jobs/${encodeURIComponent(service)}/${encodeURIComponent(jobId)}`, { signal: ctx.signal }));
    } catch (err) {
      if (err.name !== "AbortError") alerts.show(err.status === 404 ? `No job ${jobId} in ${service}.` : `Could not load the job: ${messageOf(err)}`);
      return;
    }
    loadReport();
    await watchJob(service, jobId, {
      signal: ctx.signal,
      onEvent,
      onEnd: (final) => {
        showJob(final);
        setText(streamNote, "The job has finished; these are its final figures.");
        reportLoaded = false;
        loadReport();
      },
      onStatus: ({ live, error, final }) => {
        if (error) alerts.show(final ? `Live updates stopped: ${error}` : error);
        else if (live) { alerts.clear(); setText(streamNote, "Live: updates appear as the job reports them."); }
        else if (live === false) setText(streamNote, "Reconnecting to the job's events…");
      },
    });
  })();
}

function reportTable(rows) {
  if (!rows.length) return emptyState("The report has no figures.");
  const body = h("tbody");
  for (const row of rows) {
    let change = "—";
    if (isNum(row.before) && isNum(row.after) && row.before !== 0) {
      const ratio = row.after / row.before;
      const better = row.higher_is_better === null || row.higher_is_better === undefined
        ? "" : ((ratio > 1) === Boolean(row.higher_is_better) ? " (better)" : ratio === 1 ? "" : " (worse)");
      change = `×${ratio.toFixed(2)}${better}`;
    }
    body.append(h("tr", {},
      h("th", { scope: "row", text: row.metric }),
      h("td", { class: "num", text: fmtValue(row.before, row.unit) }),
      h("td", { class: "num", text: fmtValue(row.after, row.unit) }),
      h("td", { class: "num", text: change })));
  }
  return tableWrap(h("table", { id: "job-report" },
    tableHead(["Metric", "Before", "After", "Change"]),
    body), "Optimization report");
}

// ---------------------------------------------------------------------------------------------
// Models

function modelsPage(main, _params, ctx) {
  const alerts = alertSlot();
  const metricsNote = h("p", { class: "warning-state", role: "status", hidden: true });
  const summary = h("p", { id: "models-summary", class: "summary", "aria-live": "polite" });
  const tbody = h("tbody");
  const table = h("table", { id: "models-table" },
    h("caption", { class: "visually-hidden", text: "Served models with live figures" }),
    tableHead(["Model", "Version", "State", "Task", "Backend", "Tokens/s", "Requests/s",
      "Queue by level", "Batch occupancy", "p50 latency", "p99 latency", "TTFT p50 / p99", ""]),
    tbody);
  const view = tableView(table, "Models", "No models are loaded. Load one below.");

  const nameIn = h("input", { id: "load-name", name: "name", required: true, maxlength: 256, autocomplete: "off" });
  const uriIn = h("input", { id: "load-uri", name: "uri", required: true, maxlength: 2048, autocomplete: "off",
    placeholder: "artifact://models/… or a path" });
  const versionIn = h("input", { id: "load-version", name: "version", maxlength: 128, autocomplete: "off" });
  const submit = h("button", { id: "load-submit", type: "submit", text: "Load model" });
  const formAlert = alertSlot();
  const formStatus = h("p", { class: "form-status", role: "status" });
  const form = h("form", { id: "load-form", class: "card", "aria-labelledby": "load-title" },
    h("h2", { id: "load-title", text: "Load a model" }),
    h("div", { class: "form-row" },
      h("div", { class: "field" }, h("label", { for: "load-name", text: "Name" }), nameIn),
      h("div", { class: "field grow" }, h("label", { for: "load-uri", text: "URI" }), uriIn),
      h("div", { class: "field" }, h("label", { for: "load-version", text: "Version (optional)" }), versionIn),
      h("div", { class: "field end" }, submit)),
    formAlert.el, formStatus);

  append(main, [h("h1", { tabindex: -1, text: "Models" }), alerts.el, metricsNote, summary, view.wrap, view.empty, form]);

  const load = async () => {
    try {
      const data = await api("/ui/api/models", { signal: ctx.signal });
      if (!ctx.alive) return;
      alerts.clear();
      metricsNote.hidden = !data.metrics_error;
      setText(metricsNote, data.metrics_error ? `Live figures unavailable: ${data.metrics_error}` : "");
      const models = data.models || [];
      renderModelRows(tbody, models, ctx, load, alerts);
      view.show(models.length);
      const ready = models.filter((m) => m.ready).length;
      setText(summary, models.length ? `${models.length} model version${models.length === 1 ? "" : "s"}, ${ready} ready.` : "");
    } catch (err) {
      if (err.name === "AbortError") return;
      alerts.show(messageOf(err));
      view.hide();
      metricsNote.hidden = true;
      setText(summary, "");
    }
  };
  ctx.every(2000, load);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!form.reportValidity()) return;
    const body = { name: nameIn.value.trim(), uri: uriIn.value.trim() };
    if (versionIn.value.trim()) body.version = versionIn.value.trim();
    submit.disabled = true;
    formAlert.clear();
    setText(formStatus, `Loading ${body.name}…`);
    try {
      const model = await api("/ui/api/models/load", { method: "POST", body, signal: ctx.signal });
      setText(formStatus, `Loaded ${model.name} version ${model.version || "—"} (${model.state}).`);
      form.reset();
      load();
    } catch (err) {
      if (err.name === "AbortError") return;
      setText(formStatus, "");
      formAlert.show(`Could not load the model: ${messageOf(err)}`);
    } finally {
      submit.disabled = false;
    }
  });
}

function renderModelRows(tbody, models, ctx, reload, alerts) {
  syncChildren(tbody, models, {
    keyOf: (model) => `${model.name}\u0000${model.version}`,
    create: (model, key) => modelRow(model, key, ctx, reload, alerts),
    update: fillModelRow,
  });
}

function modelRow(model, key, ctx, reload, alerts) {
  const unload = h("button", { type: "button", class: "unload secondary", text: "Unload",
    "aria-label": `Unload ${model.name} version ${model.version || "—"}` });
  unload.addEventListener("click", async () => {
    const yes = await confirmAction("Unload this model?",
      `${model.name} version ${model.version || "—"} stops serving; requests for it will fail.`, "Unload");
    if (!yes || !ctx.alive) return;
    unload.disabled = true;
    const body = { name: model.name };
    if (model.version) body.version = model.version;
    try {
      await api("/ui/api/models/unload", { method: "POST", body, signal: ctx.signal });
      row.remove();
      reload();
    } catch (err) {
      if (err.name === "AbortError") return;
      unload.disabled = false;
      alerts.show(`Could not unload ${model.name}: ${messageOf(err)}`);
    }
  });
  const row = h("tr", { "data-model": model.name, "data-version": model.version ?? "", "data-key": key },
    h("th", { scope: "row", class: "model-name", text: model.name }),
    h("td", { class: "model-version mono", text: model.version || "—" }),
    h("td", {}, h("span", { class: "model-state badge" })),
    h("td", { class: "model-task" }), h("td", { class: "model-backend" }),
    h("td", { class: "fig-tps num" }), h("td", { class: "fig-rps num" }), h("td", { class: "fig-queue" }),
    h("td", { class: "fig-occupancy num" }), h("td", { class: "fig-p50 num" }), h("td", { class: "fig-p99 num" }),
    h("td", { class: "fig-ttft num" }), h("td", {}, unload));
  return row;
}

function fillModelRow(row, model) {
  const f = model.figures || {};
  const badge = row.querySelector(".model-state");
  setText(badge, model.generating ? `${model.state} · generating` : model.state);
  badge.dataset.state = model.state;
  setText(row.querySelector(".model-task"), model.task || "—");
  setText(row.querySelector(".model-backend"), model.backend || "—");
  setText(row.querySelector(".fig-tps"), fmtNum(f.tokens_per_second, 1));
  setText(row.querySelector(".fig-rps"), fmtNum(f.requests_per_second, 2));
  setText(row.querySelector(".fig-queue"), fmtQueue(f.queue_by_level));
  setText(row.querySelector(".fig-occupancy"), fmtPct(f.batch_occupancy));
  setText(row.querySelector(".fig-p50"), fmtMs(f.latency_p50_ms));
  setText(row.querySelector(".fig-p99"), fmtMs(f.latency_p99_ms));
  setText(row.querySelector(".fig-ttft"), isNum(f.ttft_p50_ms) || isNum(f.ttft_p99_ms)
    ? `${fmtMs(f.ttft_p50_ms)} / ${fmtMs(f.ttft_p99_ms)}` : "—");
}

// ---------------------------------------------------------------------------------------------
// Artifacts

const artifactFilter = { kind: "" };

function artifactsPage(main, _params, ctx) {
  const kindSelect = h("select", { id: "artifact-kind" },
    h("option", { value: "", text: "All kinds" }), ARTIFACT_KINDS.map((k) => h("option", { value: k, text: k })));
  kindSelect.value = artifactFilter.kind;
  const alerts = alertSlot();
  const tbody = h("tbody");
  const table = h("table", { id: "artifacts-table" },
    h("caption", { class: "visually-hidden", text: "Artifacts in the registry" }),
    tableHead(["Name", "Kind", "Version", "Aliases", "Size", "Created", "URI"]),
    tbody);
  const view = tableView(table, "Artifacts");
  const lineage = h("section", { id: "lineage", "aria-labelledby": "lineage-title" },
    h("h2", { id: "lineage-title", text: "Lineage" }),
    emptyState("Choose an artifact to see where it came from and what was made from it."));

  append(main, [
    h("h1", { tabindex: -1, text: "Artifacts" }),
    h("form", { class: "filters", onsubmit: (e) => e.preventDefault() },
      h("div", { class: "field" }, h("label", { for: "artifact-kind", text: "Kind" }), kindSelect)),
    alerts.el, view.wrap, view.empty, lineage,
  ]);

  let selected = null;
  const select = (uri) => {
    selected = uri;
    for (const row of tbody.rows) markSelected(row, row.dataset.uri === uri);
    showLineage(lineage, uri, ctx, select);
  };

  let generation = 0;
  const load = async () => {
    const mine = ++generation;
    try {
      const data = await api(withQuery("/ui/api/artifacts", artifactFilter), { signal: ctx.signal });
      if (mine !== generation) return;
      alerts.clear();
      const items = data.artifacts || [];
      tbody.replaceChildren(...items.map((a) => {
        const row = h("tr", { "data-uri": a.uri },
          h("th", { scope: "row", text: a.name || "—" }),
          h("td", { text: a.kind || "—" }),
          h("td", { class: "mono", text: a.version || "—" }),
          h("td", {}, a.aliases?.length ? a.aliases.map((al) => h("span", { class: "tag", text: al })) : "—"),
          h("td", { class: "num", text: fmtBytes(a.size_bytes) }),
          h("td", { text: fmtTime(a.create_time) }),
          h("td", { class: "mono uri", text: a.uri }));
        row.setAttribute("aria-label", `Show the lineage of ${a.name} ${a.version || ""}`.trim());
        markSelected(row, a.uri === selected);
        return activatable(row, () => select(a.uri));
      }));
      view.show(items.length, artifactFilter.kind ? `No ${artifactFilter.kind} in the registry.` : "The registry holds no artifacts yet.");
    } catch (err) {
      if (err.name === "AbortError" || mine !== generation) return;
      alerts.show(`Could not load the artifacts: ${messageOf(err)}`);
      view.hide();
    }
  };
  kindSelect.addEventListener("change", () => { artifactFilter.kind = kindSelect.value; load(); });
  load();
}

function markSelected(row, on) {
  row.classList.toggle("selected", on);
  if (on) row.setAttribute("aria-current", "true"); else row.removeAttribute("aria-current");
}

async function showLineage(section, uri, ctx, select) {
  const title = section.querySelector("h2");
  section.replaceChildren(title, h("p", { class: "empty-state", role: "status", text: "Loading lineage…" }));
  let graph;
  try {
    graph = await api(withQuery("/ui/api/artifacts/lineage", { uri }), { signal: ctx.signal });
  } catch (err) {
    if (err.name !== "AbortError") section.replaceChildren(title, errorState(`Could not load the lineage: ${messageOf(err)}`));
    return;
  }
  const nodes = graph.nodes || [];
  if (!nodes.length) {
    section.replaceChildren(title, emptyState("The registry has no lineage for this artifact."));
    return;
  }
  section.replaceChildren(title,
    h("p", { class: "hint", text: "Inputs on the left, what was made from them on the right. Tab to a node and press Enter to follow its lineage." }),
    h("div", { class: "lineage-wrap" }, lineageSvg(nodes, graph.edges || [], uri, select)));
  const focused = section.querySelector(`g.node[data-uri="${CSS.escape(uri)}"]`);
  if (focused && document.activeElement?.closest?.("#lineage")) focused.focus();
}

// Layered left to right by kind. A kind's band takes more than one column when its artifacts feed each
// other (a tokenizer into a dataset, a model into its quantized copy), so that every edge points right.
function lineageSvg(nodes, edges, selectedUri, select) {
  const NODE_W = 170, NODE_H = 54, GAP_X = 56, GAP_Y = 18, PAD = 12;
  const rankOf = (n) => LAYER[String(n.kind || "").toLowerCase()] ?? 5;
  const rank = new Map(nodes.map((n) => [n.uri, rankOf(n)]));
  const col = new Map();
  let start = 0;
  for (const band of [...new Set(rank.values())].sort((a, b) => a - b)) {
    const members = nodes.filter((n) => rank.get(n.uri) === band).map((n) => n.uri);
    const sub = new Map(members.map((uri) => [uri, 0]));
    const inner = edges.filter((e) => sub.has(e.from) && sub.has(e.to) && e.from !== e.to);
    // Longest path within the band; a cycle stops after as many rounds as there are members.
    for (let round = 0; round < members.length; round += 1) {
      let moved = false;
      for (const e of inner) {
        if (sub.get(e.to) <= sub.get(e.from)) { sub.set(e.to, sub.get(e.from) + 1); moved = true; }
      }
      if (!moved) break;
    }
    for (const uri of members) col.set(uri, start + sub.get(uri));
    start += Math.max(...sub.values()) + 1;
  }
  const columns = Array.from({ length: start }, () => []);
  for (const node of nodes) columns[col.get(node.uri)].push(node);
  const pos = new Map();
  const tallest = Math.max(...columns.map((c) => c.length));
  const height = PAD * 2 + tallest * NODE_H + (tallest - 1) * GAP_Y;
  columns.forEach((column, ci) => {
    const colHeight = column.length * NODE_H + (column.length - 1) * GAP_Y;
    const top = (height - colHeight) / 2;
    column.forEach((node, ri) => pos.set(node.uri, { x: PAD + ci * (NODE_W + GAP_X), y: top + ri * (NODE_H + GAP_Y) }));
  });
  const width = PAD * 2 + columns.length * NODE_W + (columns.length - 1) * GAP_X;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "group",
    "aria-label": `Lineage graph: ${nodes.length} artifacts, ${edges.length} links` });
  svg.append(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
    s("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow-head" }))));
  const edgeLayer = s("g", { class: "edges" });
  for (const edge of edges) {
    const a = pos.get(edge.from), b = pos.get(edge.to);
    if (!a || !b) continue;
    const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
    const mid = (x1 + x2) / 2;
    edgeLayer.append(s("path", { class: "edge", d: `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2 - 2} ${y2}`,
      "marker-end": "url(#arrow)", "data-from": edge.from, "data-to": edge.to },
    s("title", { text: `${edge.relation || "input"}${edge.job_id ? ` (job ${edge.job_id})` : ""}` })));
  }
  svg.append(edgeLayer);
  const clip = (text, n) => (text.length > n ? `${text.slice(0, n - 1)}…` : text);
  for (const node of nodes) {
    const p = pos.get(node.uri);
    const label = `${node.kind || "artifact"} ${node.name || node.uri}${node.version ? ` version ${node.version}` : ""}`;
    const g = s("g", { class: `node${node.uri === selectedUri ? " selected" : ""}`, "data-uri": node.uri,
      "data-kind": node.kind || "", transform: `translate(${p.x} ${p.y})`, tabindex: 0, role: "button",
      "aria-label": label, "aria-pressed": String(node.uri === selectedUri) },
    s("title", { text: node.uri }),
    s("rect", { width: NODE_W, height: NODE_H, rx: 8, ry: 8 }),
    s("text", { x: 10, y: 19, class: "node-kind", text: clip(String(node.kind || "artifact"), 24) }),
    s("text", { x: 10, y: 40, class: "node-name", text: clip(`${node.name || node.uri}${node.version ? ` · ${node.version}` : ""}`, 21) }));
    const go = () => select(node.uri);
    g.addEventListener("click", go);
    g.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); go(); }
    });
    svg.append(g);
  }
  return svg;
}

// ---------------------------------------------------------------------------------------------
// Playground: the conversation lives in memory for the page's lifetime.

const conversation = [];

function numberInput(id, bounds) {
  return h("input", { id, type: "number", min: bounds.min, max: bounds.max, step: bounds.step, value: bounds.value, required: true, inputmode: "decimal" });
}

function playgroundPage(main, _params, ctx) {
  const model = h("select", { id: "pg-model", required: true }, h("option", { value: "", text: "Loading models…" }));
  const temperature = numberInput("pg-temperature", SAMPLING.temperature);
  const topP = numberInput("pg-top-p", SAMPLING.topP);
  const maxTokens = numberInput("pg-max-tokens", SAMPLING.maxTokens);
  const system = h("textarea", { id: "pg-system", rows: 3, placeholder: "Optional instructions for the model" });
  const input = h("textarea", { id: "pg-input", rows: 3, placeholder: "Ask something" });
  const send = h("button", { id: "pg-send", type: "submit", text: "Send" });
  const stop = h("button", { id: "pg-stop", type: "button", class: "secondary", text: "Stop", disabled: true });
  const clear = h("button", { id: "pg-clear", type: "button", class: "secondary", text: "Clear conversation" });
  const messages = h("div", { id: "pg-messages", role: "log", "aria-live": "polite", "aria-label": "Conversation", "data-streaming": "false" });
  const alerts = alertSlot();
  const modelsAlert = alertSlot();
  const hint = h("p", { class: "hint", id: "pg-hint", text: "Ctrl+Enter sends." });
  input.setAttribute("aria-describedby", "pg-hint");

  const settings = h("form", { class: "card settings", "aria-labelledby": "pg-settings-title", onsubmit: (e) => e.preventDefault() },
    h("h2", { id: "pg-settings-title", text: "Settings" }),
    h("div", { class: "field" }, h("label", { for: "pg-model", text: "Model" }), model),
    h("div", { class: "field" }, h("label", { for: "pg-temperature", text: `Temperature (${SAMPLING.temperature.min}–${SAMPLING.temperature.max})` }), temperature),
    h("div", { class: "field" }, h("label", { for: "pg-top-p", text: `Top-p (${SAMPLING.topP.min}–${SAMPLING.topP.max})` }), topP),
    h("div", { class: "field" }, h("label", { for: "pg-max-tokens", text: `Max tokens (${SAMPLING.maxTokens.min}–${SAMPLING.maxTokens.max})` }), maxTokens),
    h("div", { class: "field" }, h("label", { for: "pg-system", text: "System prompt" }), system),
    modelsAlert.el);
  const chat = h("form", { class: "chat", "aria-labelledby": "pg-chat-title" },
    h("h2", { id: "pg-chat-title", class: "visually-hidden", text: "Chat" }),
    messages, alerts.el,
    h("div", { class: "field" }, h("label", { for: "pg-input", text: "Message" }), input, hint),
    h("div", { class: "buttons" }, clear, stop, send));

  append(main, [h("h1", { tabindex: -1, text: "Playground" }), h("div", { class: "playground" }, settings, chat)]);

  const bubble = (role, text) => h("div", { class: `msg ${role}` },
    h("span", { class: "who", text: role === "user" ? "You" : "Assistant" }), h("div", { class: "text", text }));
  const showEmpty = () => {
    if (!messages.children.length) messages.append(emptyState("No messages yet. Write one below."));
  };
  for (const m of conversation) messages.append(bubble(m.role, m.content));
  showEmpty();

  (async () => {
    try {
      const data = await api("/v1/models", { signal: ctx.signal });
      let names = (data.data || []).map((m) => m.id);
      // /v1/models lists embedding models too; the dashboard's model list says which ones generate.
      // Best effort: without it (inference figures unavailable) every model is offered.
      try {
        const served = await api("/ui/api/models", { signal: ctx.signal });
        const generating = new Set((served.models || []).filter((m) => m.task === "generation").map((m) => m.name));
        const chatNames = names.filter((n) => generating.has(n));
        if (chatNames.length) names = chatNames;
      } catch (err) {
        if (err.name === "AbortError") throw err;
      }
      const previous = model.value || conversation.model;
      model.replaceChildren(...(names.length ? names.map((n) => h("option", { value: n, text: n }))
        : [h("option", { value: "", text: "No models served" })]));
      if (names.includes(previous)) model.value = previous;
      if (!names.length) modelsAlert.show("No model is ready to chat. Load one on the Models page.");
    } catch (err) {
      if (err.name === "AbortError") return;
      model.replaceChildren(h("option", { value: "", text: "Models unavailable" }));
      modelsAlert.show(`Could not list the models: ${messageOf(err)}`);
    }
  })();

  let controller = null;
  ctx.onClose(() => controller?.abort());
  const streaming = (on) => {
    messages.dataset.streaming = String(on);
    messages.setAttribute("aria-busy", String(on));
    stop.disabled = !on;
    send.disabled = on;
    clear.disabled = on;
  };

  const sendMessage = async () => {
    if (controller) return;
    alerts.clear();
    for (const el of [model, temperature, topP, maxTokens]) if (!el.reportValidity()) return;
    const text = input.value;
    if (!text.trim()) { input.focus(); return; }
    conversation.model = model.value;
    conversation.push({ role: "user", content: text });
    messages.querySelector(".empty-state")?.remove();
    const userBubble = bubble("user", text);
    const reply = bubble("assistant", "");
    const replyText = reply.querySelector(".text");
    messages.append(userBubble, reply);
    input.value = "";
    const payload = {
      model: model.value, stream: true,
      temperature: Number(temperature.value), top_p: Number(topP.value), max_tokens: Number(maxTokens.value),
      messages: [...(system.value.trim() ? [{ role: "system", content: system.value }] : []),
        ...conversation.map(({ role, content }) => ({ role, content }))],
    };
    controller = new AbortController();
    streaming(true);
    let content = "";
    let finished = false;
    let failed = null;
    try {
      const response = await authFetch("/v1/chat/completions", {
        method: "POST", signal: controller.signal,
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" }, body: JSON.stringify(payload),
      });
      if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
      await readSSE(response, (msg) => {
        if (msg.data === "[DONE]") { finished = true; return; }
        let chunk;
        try { chunk = JSON.parse(msg.data); } catch { return; }
        if (chunk.error) { failed = chunk.error.message || "the reply failed"; return; }
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          content += delta;
          replyText.textContent = content;
          messages.scrollTop = messages.scrollHeight;
        }
        if (chunk.choices?.[0]?.finish_reason) finished = true;
      });
      if (!finished && !failed) failed = "The reply ended early (the connection was closed).";
    } catch (err) {
      if (err.name !== "AbortError") failed = err instanceof ApiError ? err.message : "The gateway cannot be reached.";
    }
    const stopped = controller.signal.aborted;
    controller = null;
    if (ctx.alive) streaming(false);
    if (content) {
      conversation.push({ role: "assistant", content });
      if (stopped) reply.append(h("span", { class: "stopped", text: "(stopped)" }));
      if (failed) alerts.show(failed);
    } else {
      // Nothing came back: take the message back so it can be sent again.
      conversation.pop();
      userBubble.remove();
      reply.remove();
      if (!input.value) input.value = text;
      if (failed) alerts.show(`No reply: ${failed}`);
      showEmpty();
    }
  };

  chat.addEventListener("submit", (event) => { event.preventDefault(); sendMessage(); });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); sendMessage(); }
  });
  stop.addEventListener("click", () => { controller?.abort(); input.focus(); });
  clear.addEventListener("click", () => {
    conversation.length = 0;
    messages.replaceChildren();
    alerts.clear();
    showEmpty();
    input.focus();
  });
}

// ---------------------------------------------------------------------------------------------
// Service banner, refreshed every 5 s whatever the page.

async function refreshServices() {
  const list = document.getElementById("service-status");
  try {
    const data = await api("/ui/api/services");
    syncChildren(list, data.services || [], {
      keyAttr: "service",
      keyOf: (svc) => svc.name,
      create: (svc) => h("li", { "data-service": svc.name }, h("span", { class: "dot", "aria-hidden": "true" }), h("span", { class: "label" })),
      update: (li, svc) => {
        if (li.dataset.status !== svc.status) li.dataset.status = svc.status;
        setText(li.querySelector(".label"), `${svc.name}: ${svc.status.replace("_", " ").toLowerCase()}`);
      },
    });
    list.removeAttribute("data-error");
  } catch (err) {
    if (list.dataset.error !== messageOf(err)) {
      list.dataset.error = messageOf(err);
      list.replaceChildren(h("li", { class: "banner-error", text: `Service status unavailable: ${messageOf(err)}` }));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Router

const ROUTES = [
  { pattern: /^\/jobs\/([^/]+)\/([^/]+)$/, section: "jobs", title: "Job", render: jobDetailPage,
    params: (m) => ({ service: decodeURIComponent(m[1]), jobId: decodeURIComponent(m[2]) }) },
  { pattern: /^\/jobs$/, section: "jobs", title: "Jobs", render: jobsPage },
  { pattern: /^\/models$/, section: "models", title: "Models", render: modelsPage },
  { pattern: /^\/artifacts$/, section: "artifacts", title: "Artifacts", render: artifactsPage },
  { pattern: /^\/playground$/, section: "playground", title: "Playground", render: playgroundPage },
];

let current = null;

function route(moveFocus) {
  const path = (location.hash.replace(/^#/, "") || "/jobs").split("?")[0];
  let match = null;
  let found = ROUTES.find((r) => (match = r.pattern.exec(path)));
  if (!found) {
    found = ROUTES[1];
    match = [];
    if (location.hash && location.hash !== "#/jobs") history.replaceState(null, "", "#/jobs");
  }
  current?.close();
  current = new PageContext();
  for (const link of document.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === `#/${found.section}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${found.title} · FastServe`;
  const main = document.getElementById("page");
  main.replaceChildren();
  main.dataset.page = found.section;
  try {
    found.render(main, found.params ? found.params(match) : {}, current);
  } catch (err) {
    main.replaceChildren(errorState(`This page failed to draw: ${messageOf(err)}`));
  }
  if (moveFocus) (main.querySelector("h1") || main).focus();
}

// A promise nobody awaits must not end up as an uncaught error in the console.
window.addEventListener("unhandledrejection", (event) => {
  if (event.reason?.name === "AbortError") event.preventDefault();
});

window.addEventListener("hashchange", () => route(true));
route(false);
refreshServices();
setInterval(refreshServices, 5000);
