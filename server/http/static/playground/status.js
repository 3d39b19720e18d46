// The operations page: readiness, workers, variants, queue depth and the caller's recent requests, from the
// server's public routes (/health/ready, /metrics, /openapi.json, /queue/requests), refreshed every few seconds.

import { Api, appsOf, saveKey, savedKey, variantsOf } from "./api.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const INTERVAL_S = Math.max(0.2, Number(params.get("refresh")) || 5);
const api = new Api(() => $("api-key").value);

/** One sample of a Prometheus text exposition (unlabelled), or null. */
export function metricValue(text, name) {
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line ? Number(line.slice(name.length + 1)) : null;
}

async function readiness() {
  const response = await fetch("/health/ready");
  const body = await response.json().catch(() => ({}));
  $("readiness").textContent = body.status || `HTTP ${response.status}`;
  $("readiness").className = `value ${response.ok ? "ok" : "bad"}`;
  const warming = body.warming ? `warming up: ${body.warming.runs_left} runs left` : "";
  $("readiness-detail").textContent = body.detail || warming;
  const workers = body.workers || [];
  $("worker-count").textContent = String(workers.length);
  $("workers").replaceChildren(
    ...workers.map((w) => Object.assign(document.createElement("li"), { textContent: `${w.name} (${w.device || "?"}): ${w.state}` })),
  );
}

async function queue() {
  const text = await (await fetch("/metrics")).text();
  const depth = metricValue(text, "inpaint_queue_depth");
  const running = metricValue(text, "inpaint_in_progress");
  $("queue-depth").textContent = depth === null ? "?" : String(depth);
  $("in-progress").textContent = running === null ? "" : `${running} running`;
}

async function variants() {
  const apps = appsOf(await api.openapi());
  $("variants").replaceChildren(
    ...variantsOf(apps).map((v) => Object.assign(document.createElement("li"), { textContent: `${v.label} (${v.appId})` })),
  );
}

function seconds(from, to) {
  if (!from || !to) return "";
  return `${((Date.parse(to) - Date.parse(from)) / 1000).toFixed(2)} s`;
}

async function recent() {
  const box = $("recent-error");
  try {
    const { requests } = await api.recent(20);
    box.hidden = true;
    $("recent").replaceChildren(
      ...requests.map((r) => {
        const row = document.createElement("tr");
        const state = r.error_type ? `${r.state} (${r.error_type})` : r.state;
        const cells = [r.request_id, r.app_id, state, new Date(r.created_at).toLocaleString(),
          seconds(r.created_at, r.started_at), seconds(r.started_at, r.finished_at)];
        row.append(...cells.map((text) => Object.assign(document.createElement("td"), { textContent: text })));
        row.dataset.requestId = r.request_id;
        return row;
      }),
    );
  } catch (error) {
    box.textContent = error.message;
    box.hidden = false;
  }
}

async function refresh() {
  await Promise.allSettled([readiness(), queue(), recent()]);
  $("updated").textContent = new Date().toLocaleTimeString();
  document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
}

async function start() {
  $("api-key").value = savedKey();
  $("api-key").addEventListener("change", () => {
    saveKey($("api-key").value.trim());
    recent();
  });
  $("interval").textContent = String(INTERVAL_S);
  await Promise.allSettled([variants(), refresh()]);
  setInterval(refresh, INTERVAL_S * 1000);
}

start();
