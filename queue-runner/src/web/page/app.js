// The status pages of a drover farm: live over server-sent events from the runner's own API,
// with the credential the browser holds (the drover_token cookie). No external fetches.
"use strict";

const $ = (selector) => document.querySelector(selector);

// A derivation's name: /nix/store/<hash>-hello-2.12.1.drv is hello-2.12.1.
function drvName(path) {
  const base = String(path || "").split("/").pop().replace(/\.drv$/, "");
  return base.replace(/^[0-9a-z]{32}-/, "");
}

// BUILD_STATUS_CACHED_FAILURE is cached_failure.
function statusName(value) {
  return String(value || "").replace(/^(BUILD|STEP)_STATUS_/, "").toLowerCase();
}

// Whether a build has ended: its page stops listening then.
function ended(status) {
  return ["succeeded", "failed", "dep_failed", "cancelled", "cached_failure"].includes(statusName(status));
}

function duration(ms) {
  const seconds = Math.max(0, Math.round(ms / 1000));
  if (seconds < 60) return seconds + " s";
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return minutes + " min " + (seconds % 60) + " s";
  return Math.floor(minutes / 60) + " h " + (minutes % 60) + " min";
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function link(href, text) {
  const td = document.createElement("td");
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  td.appendChild(a);
  return td;
}

function fill(table, rows, empty) {
  const body = $(table + " tbody");
  body.replaceChildren();
  for (const cells of rows) {
    const tr = document.createElement("tr");
    tr.append(...cells);
    body.appendChild(tr);
  }
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(empty, "empty");
    td.colSpan = $(table + " thead tr").children.length;
    tr.appendChild(td);
    body.appendChild(tr);
  }
}

// Opens an event stream, saying in the header whether it is live.
function listen(url, handlers) {
  const source = new EventSource(url);
  const state = $("#connection");
  source.onopen = () => { state.textContent = "live"; };
  source.onerror = () => { state.textContent = "reconnecting…"; };
  for (const [name, handler] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => handler(event.data ? JSON.parse(event.data) : {}, event));
  }
  return source;
}

// The overview: queues, builders, running steps (their elapsed time ticking), recent builds.
function overview() {
  let running = [];
  let skew = 0;
  const tick = () => fill("#running", running.map((step) => [
    cell(drvName(step.drv_path), "name"),
    cell(step.machine),
    cell(duration(Date.now() + skew - step.started_at_ms), "number"),
  ]), "nothing runs");
  listen("/api/v1/status/events", {
    overview: (data) => {
      skew = data.now_ms - Date.now();
      const systems = new Map();
      for (const queue of data.queues) {
        const row = systems.get(queue.system) || { waiting: 0, runnable: 0, running: 0 };
        row[queue.status] = queue.steps;
        systems.set(queue.system, row);
      }
      fill("#queues", [...systems].map(([system, row]) => [
        cell(system), cell(String(row.waiting), "number"),
        cell(String(row.runnable), "number"), cell(String(row.running), "number"),
      ]), "the queue is empty");
      fill("#builders", data.builders.map((builder) => [
        cell(builder.name, "name"),
        cell(builder.state, builder.state),
        cell(builder.running + "/" + builder.max_jobs, "number"),
        cell((builder.systems || []).join(" ")),
        cell(builder.quarantine_reason || ""),
      ]), "no builder has joined");
      running = data.running;
      tick();
      fill("#recent", data.recent.map((build) => [
        link("/builds/" + build.id, String(build.id)),
        cell(build.status, build.status),
        cell(drvName(build.drv_path), "name"),
        cell(new Date(build.submitted_at_ms).toLocaleString()),
      ]), "no builds yet");
    },
  });
  setInterval(tick, 1000);
}

// A build: its summary, its steps and why each waits, its predicted end, and the live log of
// a running step.
function build() {
  const id = location.pathname.split("/").pop();
  let state = null;
  let following = null;
  let logSource = null;
  let watch = null;
  const render = () => {
    $("#title").textContent = "Build " + id + ": " + drvName(state.top_drv_path);
    const facts = [
      ["status", statusName(state.status)],
      ["derivation", state.top_drv_path],
      ["submitted", new Date(Number(state.submitted_at_ms)).toLocaleString()],
    ];
    if (Number(state.estimated_end_ms) > 0 && Number(state.finished_at_ms) === 0) {
      facts.push(["predicted end", "in " + duration(Number(state.estimated_end_ms) - Date.now())]);
    }
    if (state.failure_reason) facts.push(["why", state.failure_reason]);
    const summary = $("#summary");
    summary.replaceChildren();
    for (const [term, value] of facts) {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.className = term === "status" ? value : "";
      summary.append(dt, dd);
    }
    fill("#steps", state.steps.map((step) => [
      cell(drvName(step.drv_path), "name"),
      cell(step.status, step.status),
      cell(step.builder || ""),
      cell(step.waiting_reason || step.failure_reason || ""),
    ]), "no steps: nothing to build");
    const runningStep = state.steps.find((step) => step.status === "running");
    if (runningStep && following !== runningStep.drv_path) follow(runningStep.drv_path);
    if (ended(state.status)) {
      // Everything is said: the streams would only reconnect to say it again.
      watch.close();
      $("#connection").textContent = "ended";
      if (logSource) window.setTimeout(() => logSource.close(), 2000);
    }
  };
  const follow = (drvPath) => {
    if (logSource) logSource.close();
    following = drvPath;
    $("#log-step").textContent = drvName(drvPath);
    const log = $("#log");
    logSource = new EventSource("/api/v1/logs/events?drv_path=" + encodeURIComponent(drvPath));
    // Each connection sends the log from its start.
    logSource.onopen = () => { log.textContent = ""; };
    logSource.addEventListener("log", (event) => {
      log.textContent += event.data;
      log.scrollTop = log.scrollHeight;
    });
  };
  watch = listen("/api/v1/builds/" + id + "/events", {
    state: (data) => { state = data; render(); },
    step: (data) => {
      if (!state) return;
      const index = state.steps.findIndex((step) => step.drv_path === data.drv_path);
      if (index >= 0) state.steps[index] = Object.assign(state.steps[index], data);
      render();
    },
    build: (data) => {
      if (!state) return;
      Object.assign(state, { status: data.status, failure_reason: data.failure_reason });
      if (ended(data.status)) state.finished_at_ms = String(Date.now());
      render();
    },
    estimate: (data) => {
      if (!state) return;
      state.estimated_end_ms = data.estimated_end_ms;
      render();
    },
  });
}

if (document.body.dataset.page === "overview") overview();
if (document.body.dataset.page === "build") build();
