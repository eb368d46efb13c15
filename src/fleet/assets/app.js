// edge-trainer fleet dashboard: folds the server's events (/api/stream) into
// a device table, per-device uPlot charts and an event feed.
"use strict";

const devices = new Map(); // id -> {summary, run, previous, row, card, plots, dirty}
let allowCommands = false;
const MAX_FEED = 200;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(x, digits) {
  return (typeof x === "number" && isFinite(x)) ? x.toFixed(digits === undefined ? 4 : digits) : "-";
}

function device(id) {
  let d = devices.get(id);
  if (!d) {
    d = { id, summary: null, run: null, previous: null, row: null, card: null, plots: null, dirty: true };
    devices.set(id, d);
  }
  return d;
}

function lastRunText(l) {
  if (!l) return "-";
  let t = l.outcome;
  if (l.promoted === true) t += ", promoted";
  if (l.promoted === false) t += ", kept";
  return t;
}

function sendCommand(body) {
  const out = document.getElementById("cmdresult");
  fetch("/api/command", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) })
    .then(r => r.json().then(j => ({ ok: r.ok, j })))
    .then(({ ok, j }) => { out.textContent = ok ? ("sent " + j.request_id + " to " + j.topic) : ("error: " + j.error); })
    .catch(e => { out.textContent = "error: " + e; });
}

function renderRow(d) {
  const tbody = document.querySelector("#devices tbody");
  if (!d.row) {
    d.row = el("tr", { "data-device": d.id });
    const ids = [...devices.keys()].sort();
    const next = ids.slice(ids.indexOf(d.id) + 1).map(i => devices.get(i).row).find(r => r && r.parentNode);
    tbody.insertBefore(d.row, next || null);
  }
  const s = d.summary || {};
  const run = d.run;
  const last = run && run.points.length ? run.points[run.points.length - 1] : null;
  const state = s.state || "unknown";
  d.row.className = s.online ? "" : "offline";
  d.row.setAttribute("data-state", state);
  d.row.replaceChildren();
  const cells = [
    d.id,
    (s.groups || []).join(", ") || "-",
    state,
    run ? run.run_id : "-",
    last ? (last.epoch + (run.max_epochs ? "/" + run.max_epochs : "")) : "-",
    last ? fmt(last.val_loss) : "-",
    last ? fmt(last.val_acc) : "-",
    s.current_model || "-",
    fmt(s.accuracy),
    lastRunText(s.last_run),
    s.version || "-",
  ];
  cells.forEach((c, i) => {
    const td = el("td", {}, String(c));
    if (i === 2) td.className = "state-" + state;
    d.row.appendChild(td);
  });
  const act = el("td", { class: "act" });
  if (allowCommands) {
    for (const verb of ["train", "stop"]) {
      const b = el("button", { "data-cmd": verb, "data-device": d.id }, verb);
      b.addEventListener("click", () => sendCommand({ verb, device: d.id }));
      act.appendChild(b);
    }
  }
  d.row.appendChild(act);
}

// uPlot wants one x array shared by every series: the union of both runs' steps.
function aligned(run, prev, keys) {
  const xs = new Set();
  for (const r of [run, prev]) if (r) for (const p of r.points) xs.add(p.step);
  const x = [...xs].sort((a, b) => a - b);
  const index = new Map(x.map((v, i) => [v, i]));
  const cols = [x];
  for (const [which, key] of keys) {
    const r = which === "cur" ? run : prev;
    const col = new Array(x.length).fill(null);
    if (r) for (const p of r.points) {
      const v = p[key];
      col[index.get(p.step)] = (typeof v === "number" && isFinite(v)) ? v : null;
    }
    cols.push(col);
  }
  return cols;
}

const CHARTS = [
  { title: "loss", keys: [["cur", "train_loss", "#7aa6d6", false], ["cur", "val_loss", "#1d3b57", false], ["prev", "val_loss", "#888", true]] },
  { title: "accuracy", keys: [["cur", "train_acc", "#8cc79b", false], ["cur", "val_acc", "#217a3c", false], ["prev", "val_acc", "#888", true]] },
  { title: "lr", keys: [["cur", "lr", "#b06500", false], ["prev", "lr", "#888", true]] },
];

function renderCard(d) {
  if (!d.card) {
    d.card = el("div", { class: "card", "data-device": d.id });
    d.card.appendChild(el("h3", {}, d.id));
    const charts = el("div", { class: "charts" });
    d.card.appendChild(charts);
    document.getElementById("cards").appendChild(d.card);
    d.plots = CHARTS.map(c => {
      const box = el("div", { "data-chart": c.title });
      charts.appendChild(box);
      const opts = {
        title: c.title, width: 260, height: 150, legend: { show: false },
        scales: { x: { time: false } },
        series: [{ label: "step" }].concat(c.keys.map(([w, k, color, dash]) => ({
          label: (w === "prev" ? "previous " : "") + k, stroke: color, width: 1.5, spanGaps: true,
          dash: dash ? [4, 4] : undefined, points: { show: false },
        }))),
      };
      return new uPlot(opts, aligned(null, null, c.keys.map(k => [k[0], k[1]])), box);
    });
  }
  const n = d.run ? d.run.points.length : 0;
  d.card.setAttribute("data-points", String(n));
  d.card.setAttribute("data-run", d.run ? d.run.run_id : "");
  d.card.setAttribute("data-previous-points", String(d.previous ? d.previous.points.length : 0));
  CHARTS.forEach((c, i) => d.plots[i].setData(aligned(d.run, d.previous, c.keys.map(k => [k[0], k[1]]))));
}

function render() {
  let online = 0, training = 0;
  for (const d of devices.values()) {
    if (d.summary && d.summary.online) online++;
    if (d.summary && d.summary.state === "training") training++;
    if (!d.dirty) continue;
    d.dirty = false;
    renderRow(d);
    renderCard(d);
  }
  document.getElementById("counts").textContent =
    devices.size + " devices, " + online + " online, " + training + " training";
}

let scheduled = false;
function schedule() {
  if (scheduled) return;
  scheduled = true;
  setTimeout(() => { scheduled = false; render(); }, 250);
}

function addFeed(item) {
  const feed = document.getElementById("feed");
  const li = el("li", { "data-event": item.event, "data-device": item.device });
  if (item.request_id !== undefined && item.request_id !== null) li.setAttribute("data-request-id", String(item.request_id));
  if (/failed|rejected/.test(item.event)) li.className = "failed";
  li.appendChild(el("span", { class: "dev" }, item.device));
  li.appendChild(el("span", { class: "ev" }, item.event));
  li.appendChild(document.createTextNode(item.text));
  feed.insertBefore(li, feed.firstChild);
  while (feed.children.length > MAX_FEED) feed.removeChild(feed.lastChild);
}

function onMetrics(m) {
  const d = device(m.device);
  if (!d.run || d.run.run_id !== m.run_id) {
    if (d.previous && d.previous.run_id === m.run_id) { d.previous.points.push(m.point); d.dirty = true; return; }
    d.previous = d.run;
    d.run = { run_id: m.run_id, points: [], max_epochs: null };
  }
  d.run.points.push(m.point);
  if (d.run.points.length > 4000) d.run.points.splice(0, d.run.points.length - 4000);
  d.dirty = true;
}

function onEvent(item) {
  addFeed(item);
  if (item.event === "run_started" && item.run_id) {
    const d = device(item.device);
    if (!d.run || d.run.run_id !== item.run_id) {
      d.previous = d.run;
      d.run = { run_id: item.run_id, points: [], max_epochs: null };
    }
    const m = /\((\d+) epochs max\)/.exec(item.text);
    if (m) d.run.max_epochs = Number(m[1]);
    d.dirty = true;
  }
}

function loadSnapshot(s) {
  allowCommands = !!s.allow_commands;
  document.getElementById("controls").classList.toggle("on", allowCommands);
  document.querySelector("#devices th.act").textContent = allowCommands ? "commands" : "";
  for (const d of devices.values()) { if (d.row) d.row.remove(); if (d.card) d.card.remove(); }
  devices.clear();
  for (const x of s.devices) {
    const d = device(x.summary.device_id);
    d.summary = x.summary; d.run = x.run; d.previous = x.previous;
  }
  const feed = document.getElementById("feed");
  feed.replaceChildren();
  for (const item of s.feed) addFeed(item);
  render();
}

function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource("/api/stream");
  es.addEventListener("open", () => { conn.textContent = "live"; conn.className = ""; });
  es.addEventListener("error", () => { conn.textContent = "reconnecting…"; conn.className = "down"; });
  es.addEventListener("snapshot", e => loadSnapshot(JSON.parse(e.data)));
  es.addEventListener("update", e => {
    const u = JSON.parse(e.data);
    if (u.type === "device") {
      if (u.summary) { const d = device(u.id); d.summary = u.summary; d.dirty = true; }
      else { const d = devices.get(u.id); if (d) { if (d.row) d.row.remove(); if (d.card) d.card.remove(); devices.delete(u.id); } }
    } else if (u.type === "metrics") {
      onMetrics(u);
    } else if (u.type === "event") {
      onEvent(u.item);
    }
    schedule();
  });
}

function groupCommand(verb) {
  const g = document.getElementById("group").value.trim();
  if (g) sendCommand({ verb, group: g });
}
document.getElementById("train-group").addEventListener("click", () => groupCommand("train"));
document.getElementById("stop-group").addEventListener("click", () => groupCommand("stop"));
document.getElementById("train-all").addEventListener("click", () => sendCommand({ verb: "train", all: true }));
document.getElementById("stop-all").addEventListener("click", () => sendCommand({ verb: "stop", all: true }));
connect();
