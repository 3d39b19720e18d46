// Shared helpers for the scenarios that drive inpaint-server with the real fal JS clients.
//
// Nothing here patches a client: the scenarios only use the clients' public configuration
// (proxyUrl, fetch, requestMiddleware). The recording fetch below passes every call through
// unchanged; it only notes what went over the wire so the Python test can assert on it, and it
// refuses any URL that is not the server under test (no call may reach the real fal.ai).

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

export const LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting";
export const HYPER = "fal-ai/hyper-sdxl/inpainting";
export const SIZE = { width: 64, height: 48 };
export const POLL_MS = 50;

/** Node's own fetch, captured before a scenario installs its recorder as the global one. */
export const realFetch = globalThis.fetch;

/** Command-line options shared by every scenario. */
export function options(extra = {}) {
  const { values } = parseArgs({
    options: {
      base: { type: "string" },
      hook: { type: "string" },
      image: { type: "string" },
      mask: { type: "string" },
      key: { type: "string" },
      other: { type: "string" },
      transport: { type: "string" },
      ...extra,
    },
  });
  if (!values.base) throw new Error("--base <server URL> is required");
  values.base = values.base.replace(/\/+$/, "");
  return values;
}

/** A PNG file as a Blob, the way a browser or Node user hands a file to the client. */
export function pngBlob(path) {
  return new Blob([readFileSync(path)], { type: "image/png" });
}

/** fal's hosts mapped onto one server: run at /, queue at /queue/, REST at /rest/. */
export function rewriter(base) {
  const map = [
    ["https://fal.run/", `${base}/`],
    ["https://queue.fal.run/", `${base}/queue/`],
    ["https://rest.fal.ai/", `${base}/rest/`],
    ["https://rest.alpha.fal.ai/", `${base}/rest/`],
  ];
  return (url) => {
    for (const [from, to] of map) {
      if (url.startsWith(from)) return to + url.slice(from.length);
    }
    return url;
  };
}

/**
 * A fetch that records each call (method, URL, x-fal-target-url, HTTP status, JSON body of
 * POSTs) and optionally rewrites the URL first. Calls to anything but `base` are refused.
 */
export function recordingFetch(base, rewrite = (u) => u) {
  const calls = [];
  const fetchFn = async (input, init = {}) => {
    const original = input instanceof Request ? input.url : String(input);
    const url = rewrite(original);
    const headers = new Headers(init.headers || {});
    const call = {
      method: (init.method || "GET").toUpperCase(),
      url,
      target: headers.get("x-fal-target-url"),
      authorization: headers.get("authorization"),
    };
    if (call.method !== "PUT" && typeof init.body === "string") {
      try {
        call.body = JSON.parse(init.body);
      } catch {
        call.body = init.body;
      }
    }
    calls.push(call);
    if (!url.startsWith(`${base}/`)) {
      call.refused = true;
      throw new Error(`refusing a call outside the server under test: ${original}`);
    }
    const response = await realFetch(url, init);
    call.status = response.status;
    call.contentType = response.headers.get("content-type");
    return response;
  };
  return { fetch: fetchFn, calls };
}

/** What a thrown error looked like to the caller. */
export function describeError(err, classes = {}) {
  if (err === undefined || err === null) return null;
  const out = {
    name: err.name,
    message: String(err.message || err),
    status: err.status,
    requestId: err.requestId,
    body: err.body,
  };
  for (const [label, cls] of Object.entries(classes)) out[`is${label}`] = err instanceof cls;
  if (typeof err.fieldErrors !== "undefined") out.fieldErrors = err.fieldErrors;
  return out;
}

/** Run `fn`, returning {value} or {error} (never throws). */
export async function attempt(fn, classes = {}) {
  try {
    const value = await fn();
    return { value: value === undefined ? null : value };
  } catch (err) {
    return { error: describeError(err, classes) };
  }
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Poll `getStatus` until `done(status)` holds; returns every status seen. */
export async function pollUntil(getStatus, done, timeoutMs = 30000) {
  const seen = [];
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await getStatus();
    seen.push(status);
    if (done(status)) return seen;
    if (Date.now() > deadline) throw new Error(`gave up polling; last status ${JSON.stringify(status)}`);
    await sleep(POLL_MS);
  }
}

/** Keep the status updates small: state, position, log messages, error fields. */
export function brief(status) {
  if (!status || typeof status !== "object") return status;
  const out = { status: status.status };
  if ("queue_position" in status) out.queue_position = status.queue_position;
  if ("logs" in status) out.logs = Array.isArray(status.logs) ? status.logs.map((l) => l.message) : status.logs;
  for (const key of ["request_id", "error", "error_type", "metrics", "response_url", "status_url", "cancel_url"]) {
    if (key in status) out[key] = status[key];
  }
  return out;
}

/** Print the observations as the last line of stdout. */
export function report(observations) {
  process.stdout.write(`${JSON.stringify(observations)}\n`);
}

/** Guard: a scenario must finish well inside the Python-side timeout. */
export function deadline(ms) {
  const timer = setTimeout(() => {
    process.stderr.write(`scenario did not finish within ${ms} ms\n`);
    process.exit(3);
  }, ms);
  timer.unref();
}
