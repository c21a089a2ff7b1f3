// The playground: runs a request with "trace": true, streaming, and draws the canvas as it denoises;
// afterwards any step is redrawn from the trace (server/trace.py: start from `start`, write each step's
// tokens at its positions, take `canvas` whole where given). Plain JavaScript, no build step.
"use strict";

const KEY_STORE = "diffutron-api-key";
const $ = (id) => document.getElementById(id);
let info = null;  // GET /v1/engine

// ------------------------------------------------------------------ the API: fetch, errors, SSE
class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
  get readable() {
    const where = this.param ? ` (${this.param})` : "";
    if (this.status === 401) return `The server needs its API key (401): ${this.message}`;
    if (this.status === "stream") return `The server stopped the run: ${this.message}`;
    return this.status ? `HTTP ${this.status}: ${this.message}${where}` : this.message;
  }
}

async function api(path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.authorization = `Bearer ${key}`;
  if (body) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {method: body ? "POST" : "GET", headers, body: body && JSON.stringify(body)});
  } catch (e) {
    throw new ApiError(0, `cannot reach the server: ${e.message}`);
  }
  if (!response.ok) {
    let message = response.statusText || "error", param = null;
    try {
      const error = (await response.json()).error || {};
      message = error.message || message;
      param = error.param;
    } catch (e) { /* not JSON: keep the status text */ }
    throw new ApiError(response.status, message, param);
  }
  return response;
}

// The JSON payloads of a server-sent event stream, read from fetch's ReadableStream; ends at [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw new ApiError("stream", payload.error.message || "error");
      yield payload;
    }
  }
  throw new ApiError(0, "the stream ended before its end ([DONE]); the server may have stopped");
}

// ------------------------------------------------------------------ the trace: the canvas at step k
function canvasAt(trace, k) {
  const start = trace[0].start;
  const c = {tokens: start.tokens.slice(), texts: start.texts.slice(), conf: start.tokens.map(() => null),
             prompt: start.prompt_tokens, mask: start.mask_token, block: null, now: new Set()};
  for (const s of trace.slice(0, k)) {
    s.positions.forEach((p, j) => {
      c.tokens[p] = s.tokens[j];
      c.texts[p] = s.texts[j];
      c.conf[p] = s.confidences[j];
    });
    if (s.canvas) {  // the server rewrote the canvas (a stop string): take it whole
      c.conf = s.canvas.tokens.map((t, p) => (t === c.tokens[p] ? c.conf[p] : null));
      c.tokens = s.canvas.tokens.slice();
      c.texts = s.canvas.texts.slice();
    }
  }
  if (k > 0) {
    c.block = trace[k - 1].block;
    c.now = new Set(trace[k - 1].positions);
  }
  return c;
}

// ------------------------------------------------------------------ drawing
function colour(conf) {  // light (unsure) to dark (sure)
  return `hsl(215, 75%, ${Math.round(94 - 64 * Math.min(1, Math.max(0, conf)))}%)`;
}

function shown(text) {
  if (!text) return "∅";
  return text.replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

function renderCanvas(pane, k) {
  const c = canvasAt(pane.trace, k);
  const starts = new Set(pane.trace.map((s) => s.block[0]));
  const promptText = c.texts.slice(0, c.prompt).join("");
  pane.el.querySelector(".prompt-view").textContent =
    (promptText.length > 240 ? "…" + promptText.slice(-240) : promptText).replace(/\n/g, "↵");
  const cells = [];
  for (let p = c.prompt; p < c.tokens.length; p++) {
    const cell = document.createElement("span");
    cell.className = "cell";
    cell.dataset.pos = p;
    cell.dataset.token = c.tokens[p];
    if (c.tokens[p] === c.mask) {
      cell.classList.add("mask");
      cell.textContent = "·";
    } else {
      cell.textContent = shown(c.texts[p]);
      if (c.conf[p] !== null) {
        cell.style.background = colour(c.conf[p]);
        if (c.conf[p] > 0.55) cell.classList.add("dark");
      }
    }
    if (c.now.has(p)) cell.classList.add("now");
    if (starts.has(p) && p > c.prompt) cell.classList.add("block-start");
    if (c.block && p >= c.block[0] && p < c.block[1]) cell.classList.add("in-block");
    const conf = c.conf[p] === null ? "" : `, confidence ${c.conf[p].toFixed(3)}`;
    cell.title = `position ${p}, token ${c.tokens[p]}${conf}`;
    cells.push(cell);
  }
  pane.el.querySelector(".canvas").replaceChildren(...cells);
  pane.el.dataset.step = k;
  pane.el.querySelector(".step-label").textContent = `step ${k} / ${pane.trace.length}`;
}

function renderFigures(pane) {
  // forward passes: one per traced step; while the run is drawn, those drawn so far
  const passes = pane.seconds === null ? pane.drawn : pane.trace.length;
  const figures = [["steps asked", pane.body.steps], ["forward passes", passes]];
  if (pane.seconds !== null) {  // once the run is drawn to its end
    const tokens = pane.usage ? pane.usage.completion_tokens : null;
    if (tokens !== null) figures.push(["tokens", tokens], ["tokens/s", (tokens / pane.seconds).toFixed(1)]);
    figures.push(["time", `${(pane.seconds * 1000).toFixed(0)} ms`]);
  }
  if (pane.finish && pane.seconds !== null) figures.push(["finish", pane.finish]);
  pane.el.querySelector(".figures").replaceChildren(...figures.map(([name, value]) => {
    const span = document.createElement("span");
    const b = document.createElement("b");
    b.textContent = value;
    span.append(`${name} `, b);
    return span;
  }));
}

// ------------------------------------------------------------------ a pane: one run, its replay
function makePane(title) {
  const el = $("pane-template").content.firstElementChild.cloneNode(true);
  el.querySelector(".pane-title").textContent = title;
  const pane = {el, trace: [], text: "", usage: null, finish: null, seconds: null, body: null, ended: false,
                drawn: 0, wake: () => {}};
  const slider = el.querySelector(".slider");
  const go = (k) => {
    slider.value = Math.max(0, Math.min(pane.trace.length, k));
    renderCanvas(pane, Number(slider.value));
  };
  slider.addEventListener("input", () => go(Number(slider.value)));
  el.querySelector(".prev").addEventListener("click", () => go(Number(slider.value) - 1));
  el.querySelector(".next").addEventListener("click", () => go(Number(slider.value) + 1));
  return pane;
}

function paneError(pane, error) {
  const box = pane.el.querySelector(".error");
  box.textContent = error instanceof ApiError ? error.readable : `Error: ${error.message || error}`;
  box.hidden = false;
  pane.el.dataset.state = "error";
  if (error instanceof ApiError && error.status === 401) askForKey(error.readable);
}

// Draws the steps as they arrive, one per `delay` ms, until the stream has ended and all are drawn.
async function play(pane, delay) {
  for (;;) {
    if (pane.drawn < pane.trace.length) {
      pane.drawn += 1;
      renderCanvas(pane, pane.drawn);
      renderFigures(pane);
      await new Promise((r) => setTimeout(r, delay));
    } else if (pane.ended) {
      return;
    } else {
      await new Promise((r) => { pane.wake = r; });
    }
  }
}

async function run(pane, path, body, delay) {
  pane.body = body;
  pane.el.dataset.body = JSON.stringify(body);
  pane.el.dataset.state = "running";
  renderFigures(pane);
  const t0 = performance.now();
  let seconds = null;
  const player = play(pane, delay);
  try {
    for await (const chunk of events(await api(path, body))) {
      if (chunk.usage) pane.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        pane.text += choice.text ?? (choice.delta && choice.delta.content) ?? "";
        if (choice.trace) pane.trace.push(choice.trace);
        if (choice.finish_reason) pane.finish = choice.finish_reason;
      }
      pane.wake();
    }
    seconds = (performance.now() - t0) / 1000;
  } catch (error) {
    pane.error = error;
  }
  pane.ended = true;
  pane.wake();
  await player;
  try {
    if (pane.error) throw pane.error;
    if (!pane.trace.length || !pane.trace[0].start) throw new Error("the answer carried no trace");
    const slider = pane.el.querySelector(".slider");
    slider.max = pane.trace.length;
    slider.value = pane.trace.length;
    pane.seconds = seconds;
    pane.el.querySelectorAll(".replay button, .slider").forEach((b) => { b.disabled = false; });
    renderCanvas(pane, pane.trace.length);
    renderFigures(pane);
    pane.el.querySelector(".final-text").textContent = pane.text;
    pane.el.dataset.state = "done";
  } catch (error) {
    paneError(pane, error);
  }
}

// ------------------------------------------------------------------ controls
// [request field, SamplingParams field, kind, bounds from /v1/engine]
const CONTROLS = [
  ["max_tokens", "max_new_tokens", "int", (b) => [1, b.context]],
  ["steps", "steps", "int", (b) => [1, b.max_steps]],
  ["block_size", "block_size", "int", (b) => [1, b.context]],
  ["temperature", "temperature", "float", (b) => [0, b.max_temperature]],
  ["remasking", "remasking", "select", (b) => b.remasking],
  ["repetition_penalty", "repetition_penalty", "float", () => [null, null]],
  ["cfg_scale", "cfg_scale", "float", () => [0, null]],
  ["seed", "seed", "int", () => [0, null]],
  ["stop", "stop_strings", "text", () => []],
  ["early_stop", "early_stop", "bool", () => []],
];

function defaults() {
  return {...info.sampling_params, ...info.request_defaults};
}

function buildControls() {
  const d = defaults();
  const box = $("controls");
  box.replaceChildren();
  const add = (name, input, hint) => {
    const label = document.createElement("label");
    label.append(name, input);
    if (hint) label.title = hint;
    box.append(label);
  };
  for (const [name, field, kind, bounds] of CONTROLS) {
    const value = d[field];
    let input;
    if (kind === "select") {
      input = document.createElement("select");
      for (const option of bounds(info.bounds)) input.add(new Option(option, option, false, option === value));
    } else {
      input = document.createElement("input");
      input.type = kind === "bool" ? "checkbox" : kind === "text" ? "text" : "number";
      if (kind === "bool") input.checked = Boolean(value);
      else input.value = value === null ? "" : Array.isArray(value) ? value.join(",") : value;
      if (kind === "int" || kind === "float") {
        const [lo, hi] = bounds(info.bounds);
        if (lo !== null) input.min = lo;
        if (hi !== null) input.max = hi;
        input.step = kind === "int" ? 1 : 0.05;
      }
    }
    input.id = `c-${name}`;
    const hint = kind === "text" ? "a stop string (several: separate them with |)" :
      name === "seed" ? "empty: a random seed" : `default ${JSON.stringify(value)}`;
    add(name, input, hint);
  }
  const rule = document.createElement("select");
  rule.id = "c-rule";
  for (const r of ["schedule", "threshold", "factor"]) rule.add(new Option(r, r));
  rule.value = d.threshold !== null ? "threshold" : d.factor !== null ? "factor" : "schedule";
  add("commit rule", rule, "schedule: the exact count per step; threshold: every position at least this sure; factor");
  const ruleValue = document.createElement("input");
  Object.assign(ruleValue, {id: "c-rule-value", type: "number", step: 0.05, min: 0});
  ruleValue.value = d.threshold ?? d.factor ?? 0.9;
  add("rule value", ruleValue, "threshold in (0, 1], factor > 0");
  // compare: by default the other side of exact vs the fast preset
  $("compare-rule").value = rule.value === "schedule" ? "threshold" : "schedule";
}

// The request body from the controls; `rule` replaces the commit rule (compare mode's second run).
function requestBody(rule) {
  const mode = document.querySelector("input[name=mode]:checked").value;
  const prompt = $("prompt").value;
  const body = mode === "chat" ? {messages: [{role: "user", content: prompt}]} : {prompt};
  for (const [name, , kind] of CONTROLS) {
    const input = $(`c-${name}`);
    if (kind === "bool") body[name] = input.checked;
    else if (kind === "select") body[name] = input.value;
    else if (kind === "text") {
      const stops = input.value.split("|").filter((s) => s);
      if (stops.length) body[name] = stops.length === 1 ? stops[0] : stops;
    } else if (input.value.trim() !== "") body[name] = Number(input.value);
  }
  const [kind, value] = rule || [$("c-rule").value, Number($("c-rule-value").value)];
  body.threshold = kind === "threshold" ? value : null;
  body.factor = kind === "factor" ? value : null;
  body.stream = true;
  body.trace = true;
  body.stream_options = {include_usage: true};
  return [mode === "chat" ? "/v1/chat/completions" : "/v1/completions", body];
}

function describeRule(body) {
  if (body.threshold !== null) return `threshold ${body.threshold}`;
  if (body.factor !== null) return `factor ${body.factor}`;
  // the schedule is the oracle's tokens only on an engine without a cache (a --fast server uses one)
  const cache = info && info.engine ? info.engine.cache : "none";
  return cache === "none" ? "exact (the schedule)" : `the schedule (cache ${cache}: not exact)`;
}

async function runAll(event) {
  event.preventDefault();
  showMessage(null);
  const delay = Math.max(0, Number($("delay").value) || 0);
  const runs = [requestBody()];
  if ($("compare").checked) runs.push(requestBody([$("compare-rule").value, Number($("compare-value").value)]));
  if (runs.length > 1 && runs[0][1].seed === undefined) {  // one seed for both, so only the rule differs
    const seed = Math.floor(Math.random() * 2 ** 31);
    for (const [, body] of runs) body.seed = seed;
  }
  const panes = runs.map(([, body], i) => makePane(`${runs.length > 1 ? "AB"[i] + ": " : ""}${describeRule(body)}`));
  $("panes").replaceChildren(...panes.map((p) => p.el));
  $("panes").classList.toggle("two", panes.length > 1);
  $("run").disabled = true;
  try {
    await Promise.all(panes.map((pane, i) => run(pane, runs[i][0], runs[i][1], delay)));
  } finally {
    $("run").disabled = false;
  }
}

// ------------------------------------------------------------------ the key and the engine's settings
function showMessage(text) {
  $("message").textContent = text || "";
  $("message").hidden = !text;
}

function askForKey(why) {
  $("key-form").hidden = false;
  showMessage(why);
  $("key").focus();
}

async function connect() {
  try {
    info = await (await api("/v1/engine")).json();
  } catch (error) {
    $("engine-info").textContent = "not connected";
    if (error instanceof ApiError && error.status === 401) {
      const given = sessionStorage.getItem(KEY_STORE);
      askForKey(given ? `The server refused this key: ${error.message}` :
        "This server needs an API key: enter it to use the playground.");
    } else {
      showMessage(error instanceof ApiError ? error.readable : String(error));
    }
    return;
  }
  $("key-form").hidden = true;
  showMessage(null);
  const e = info.engine;
  $("engine-info").textContent = `model ${info.model} · cache ${e.cache} · ${e.model_dtype || e.dtype} on ` +
    `${e.model_device || e.device} · max_batch ${e.max_batch} · context ${info.bounds.context}`;
  $("engine-info").dataset.cache = e.cache;
  buildControls();
  $("run").disabled = false;
}

function start() {
  const stops = [0, 0.25, 0.5, 0.75, 1].map((c) => `${colour(c)} ${c * 100}%`);
  $("legend-bar").style.background = `linear-gradient(to right, ${stops.join(", ")})`;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    connect();
  });
  $("run-form").addEventListener("submit", (event) => {
    runAll(event).catch((error) => showMessage(`Error: ${error.message || error}`));
  });
  connect();
}

document.addEventListener("DOMContentLoaded", start);
