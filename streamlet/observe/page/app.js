// The live status page: batches arrive over /api/events (server-sent
// events), the rest of the status is polled from /api/status. No library,
// no network beyond this worker.
"use strict";

const SHOWN = 120;          // batches on the timelines
const TABLE_ROWS = 40;      // batches in the table
const SVG = "http://www.w3.org/2000/svg";
let batches = [];
let interval = null;
let selected = null;

const ROWS = [
  ["row-input", (b) => b.records / (interval || 1), (v) => v.toFixed(0) + "/s"],
  ["row-scheduling", (b) => b.scheduling_delay * 1000, ms],
  ["row-processing", (b) => b.processing_time * 1000, ms],
  ["row-total", (b) => b.total_delay * 1000, ms],
];

function ms(v) { return v < 10 ? v.toFixed(2) + " ms" : v.toFixed(0) + " ms"; }
function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function fill(tbody, rows) {
  if (!rows.length) {
    const columns = tbody.closest("table").querySelectorAll("thead th").length || 1;
    tbody.replaceChildren(el("tr", { class: "empty" }));
    tbody.firstChild.append(el("td", { colspan: columns }, "none"));
    return;
  }
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const c of cells) tr.append(el("td", {}, c === null || c === undefined ? "–" : String(c)));
    return tr;
  }));
}
function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1 << 20) return (n / 1024).toFixed(1) + " KiB";
  if (n < 1 << 30) return (n / (1 << 20)).toFixed(1) + " MiB";
  return (n / (1 << 30)).toFixed(2) + " GiB";
}

function drawRow([id, value, format]) {
  const row = document.getElementById(id);
  const shown = batches.slice(-SHOWN);
  const values = shown.map(value);
  const max = Math.max(1e-9, ...values, id !== "row-input" && interval ? interval * 1000 : 0);
  const w = 600, h = 70;
  const timeline = el("svg:svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", "data-points": values.length });
  const x = (i) => (values.length < 2 ? w / 2 : (i * w) / (values.length - 1));
  const y = (v) => h - 4 - (v / max) * (h - 8);
  timeline.append(el("svg:polyline", { points: values.map((v, i) => `${x(i)},${y(v)}`).join(" ") }));
  if (values.length) timeline.append(el("svg:circle", { cx: x(values.length - 1), cy: y(values[values.length - 1]), r: 2.5 }));
  if (id === "row-processing" && interval) {
    timeline.append(el("svg:line", { class: "interval", x1: 0, x2: w, y1: y(interval * 1000), y2: y(interval * 1000) }));
  }
  row.querySelector(".timeline").replaceChildren(timeline);

  const bins = 12, counts = new Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor((v / max) * bins))] += 1;
  const top = Math.max(1, ...counts);
  const hist = el("svg:svg", { viewBox: `0 0 ${bins * 10} ${h}`, preserveAspectRatio: "none" });
  counts.forEach((c, i) => hist.append(el("svg:rect", { x: i * 10 + 1, width: 8, y: h - (c / top) * h, height: (c / top) * h })));
  row.querySelector(".histogram").replaceChildren(hist);

  const sorted = [...values].sort((a, b) => a - b);
  const median = sorted.length ? sorted[Math.floor(sorted.length / 2)] : null;
  row.querySelector(".stat").textContent = median === null ? "–" : "median " + format(median);
}

function outcome(b) {
  if (b.dead_lettered.length) return "dead-lettered: " + b.dead_lettered.join(", ");
  return b.recovered ? "done (re-run)" : "done";
}

function drawTable() {
  const tbody = document.querySelector("#batches tbody");
  const rows = batches.slice(-TABLE_ROWS).reverse().map((b) => {
    const tr = el("tr", { "data-batch": b.id });
    const cells = [b.id, new Date(b.time * 1000).toLocaleTimeString(), b.records, b.outputs,
      ms(b.scheduling_delay * 1000), ms(b.processing_time * 1000), ms(b.commit_time * 1000),
      ms(b.total_delay * 1000), outcome(b)];
    for (const c of cells) tr.append(el("td", {}, String(c)));
    if (b.dead_lettered.length) tr.classList.add("bad");
    if (b.id === selected) tr.classList.add("selected");
    tr.addEventListener("click", () => { selected = b.id; showBatch(b); drawTable(); });
    return tr;
  });
  tbody.replaceChildren(...rows);
  document.getElementById("batch-count").textContent = `(last ${Math.min(batches.length, SHOWN)} on the timelines)`;
}

function showBatch(b) {
  const box = document.getElementById("batch-detail");
  box.hidden = false;
  box.replaceChildren(el("h3", {}, `Batch ${b.id}`));
  const ranges = el("table", { class: "ranges" });
  fill(ranges, b.ranges.map((r) => [r.source, "partition " + r.partition, `${r.start} – ${r.until}`, (r.until - r.start) + " records"]));
  if (b.ranges.length) { box.append(el("h4", {}, "Offset ranges")); box.append(ranges); }
  const blocks = Object.entries(b.blocks);
  if (blocks.length) {
    const t = el("table");
    fill(t, blocks.map(([name, v]) => [name, `blocks ${v.first} – ${v.last}`, v.records + " records"]));
    box.append(el("h4", {}, "Blocks"), t);
  }
  const handlers = el("table");
  fill(handlers, b.handlers.map((h) => [h.name, h.records + " in", h.outputs + " out", h.attempts + " call(s)",
    h.sink ? `${h.sink}: ${ms(h.commit_time * 1000)}` : "no sink", h.dead_lettered ? "dead-lettered" : "ok"]));
  box.append(el("h4", {}, "Handlers"), handlers);
  const errors = b.handlers.flatMap((h) => h.errors.map((e) => `${h.name}: ${e}`));
  for (const e of errors) box.append(el("div", { class: "bad" }, e));
}

function drawBatches() { ROWS.forEach(drawRow); drawTable(); }

function addBatch(b) {
  if (batches.length && b.id <= batches[batches.length - 1].id) return;
  batches.push(b);
  if (batches.length > 1000) batches = batches.slice(-1000);
  document.getElementById("last-batch").textContent = b.id;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok && response.status !== 503) throw new Error(path + ": " + response.status);
  return response.json();
}

async function refreshStatus() {
  let s;
  try { s = await getJSON("/api/status"); } catch (e) {
    const state = document.getElementById("state");
    state.textContent = "unreachable"; state.className = "badge down";
    return;
  }
  document.title = `streamlet: ${s.app}`;
  document.getElementById("app-name").textContent = s.app;
  const state = document.getElementById("state");
  state.textContent = s.healthy === false ? "stalled" : s.state;
  state.className = "badge " + (s.healthy === false ? "stalled" : s.state);
  if (s.state === "starting") return;
  interval = s.batch_interval;
  document.getElementById("pending").textContent = s.pending.length;
  document.getElementById("interval").textContent = ms(s.batch_interval * 1000);
  document.getElementById("uptime").textContent = duration(s.uptime);
  document.getElementById("checkpoint-age").textContent = duration(s.checkpoint_age);
  if (s.last_batch) addBatch(s.last_batch);
  const group = document.getElementById("group-line");
  group.hidden = !s.group;
  if (s.group) {
    document.getElementById("group").textContent =
      `${s.group.group} as ${s.group.worker}: tasks ${s.group.tasks.join(", ") || "none"}, ${s.group.rebalances} rebalance(s)`;
  }
  fill(document.querySelector("#sources tbody"), s.sources.flatMap((src) =>
    (src.partitions.length ? src.partitions : [{ partition: "–" }]).map((p) =>
      [src.name, src.kind, p.partition, p.position, p.latest, p.lag, src.rate_limit === null ? "none" : src.rate_limit.toFixed(0) + "/s"])));
  fill(document.querySelector("#receivers tbody"), s.receivers.map((r) =>
    [r.name, r.kind, r.pending_blocks, r.pending_records, Object.keys(r.acks).length + " key(s)", r.rate_limit === null ? "none" : r.rate_limit.toFixed(0) + "/s"]));
  fill(document.querySelector("#sinks tbody"), s.sinks.map((k) => [k.handler, k.sink, k.guarantee]));
  fill(document.querySelector("#wals tbody"), s.wals.map((w) =>
    [w.name, w.segments, bytes(w.appended_bytes), w.fsyncs, w.fsync_mean === null ? "–" : ms(w.fsync_mean * 1000)]));
  fill(document.querySelector("#errors tbody"), s.errors.slice().reverse().map((e) =>
    [e.batch, e.handler, e.failures > 1 ? `${e.error} (${e.failures} failures)` : e.error, e.dead_lettered ? "yes" : "no"]));
  fill(document.querySelector("#settings tbody"), Object.entries(s.settings).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : v]));
}

async function start() {
  await refreshStatus();
  try {
    const r = await getJSON("/api/batches?limit=1000");
    for (const b of r.batches) addBatch(b);
  } catch (e) { /* the status poll shows the worker as unreachable */ }
  drawBatches();
  const events = new EventSource("/api/events");
  events.addEventListener("batch", (event) => { addBatch(JSON.parse(event.data)); drawBatches(); });
  events.onopen = async () => {
    // After a reconnect, fetch what was missed while the stream was down.
    const last = batches.length ? batches[batches.length - 1].id : -1;
    try { for (const b of (await getJSON(`/api/batches?after=${last}`)).batches) addBatch(b); } catch (e) { /* next poll */ }
    drawBatches();
  };
  setInterval(refreshStatus, 2000);
}

document.addEventListener("DOMContentLoaded", start);
