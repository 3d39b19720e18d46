// The server's public API as the pages use it: the same routes as every fal client, on this origin only.

const KEY_STORAGE = "inpaint-server.api-key";

/** An error answer of the server, with its message as the server wrote it. */
export class ApiError extends Error {
  constructor(message, status = 0, body = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
  }
}

/** The server's message in an error body: a 422's detail items ("field: message"), a string detail, or a status. */
export function errorMessage(status, body, statusText = "") {
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((item) => detailLine(item)).join("\n");
  }
  if (body && typeof body.detail === "string" && body.detail) return body.detail;
  if (body && typeof body.message === "string" && body.message) return body.message;
  if (body && typeof body.status === "string") return body.status;
  return `HTTP ${status}${statusText ? ` ${statusText}` : ""}`;
}

function detailLine(item) {
  if (typeof item !== "object" || item === null) return String(item);
  const loc = Array.isArray(item.loc) ? item.loc.filter((part) => part !== "body").join(".") : "";
  return loc ? `${loc}: ${item.msg}` : String(item.msg ?? JSON.stringify(item));
}

/** An ApiError from a response that is not ok (the body read as JSON when it is JSON). */
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const type = (body && body.error_type) || response.headers.get("x-fal-error-type");
  const kind = type ? ` ${type}` : "";
  const message = errorMessage(response.status, body, response.statusText);
  return new ApiError(`${response.status}${kind}: ${message}`, response.status, body);
}

/** `owner/alias` of an app id: what status, result and cancel routes carry (fal drops the sub-path there). */
export function endpointOf(appId) {
  return appId.split("/").slice(0, 2).join("/");
}

export function savedKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function saveKey(value) {
  if (value) localStorage.setItem(KEY_STORAGE, value);
  else localStorage.removeItem(KEY_STORAGE);
}

/** A temporary token (a JWT, from POST /tokens/) goes as Bearer, an API key as Key. */
export function authorization(credential) {
  const value = (credential || "").trim();
  if (!value) return null;
  return /^eyJ[\w-]*\.[\w-]+\.[\w-]+$/.test(value) ? `Bearer ${value}` : `Key ${value}`;
}

export class Api {
  /** `credential()` returns the key (or token) to send now. */
  constructor(credential = savedKey) {
    this.credential = credential;
  }

  headers(extra = {}) {
    const auth = authorization(this.credential());
    return { ...(auth ? { Authorization: auth } : {}), ...extra };
  }

  async fetch(path, options = {}) {
    return fetch(path, { ...options, headers: this.headers(options.headers || {}) });
  }

  /** GET or send JSON; the parsed JSON answer, or an ApiError with the server's message. */
  async json(path, { method = "GET", body, signal } = {}) {
    const options = { method, signal, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      options.body = JSON.stringify(body);
      options.headers["Content-Type"] = "application/json";
    }
    const response = await this.fetch(path, options);
    if (!response.ok) throw await errorFrom(response);
    return response.json();
  }

  openapi() {
    return fetch("/openapi.json").then((r) => (r.ok ? r.json() : Promise.reject(new ApiError("no /openapi.json"))));
  }

  config() {
    return fetch("/ui/config.json").then((r) => (r.ok ? r.json() : { auth_required: false, limits: {} }));
  }

  submit(appId, input, signal) {
    return this.json(`/queue/${appId}`, { method: "POST", body: input, signal });
  }

  requestPath(appId, requestId, suffix = "") {
    return `/queue/${endpointOf(appId)}/requests/${requestId}${suffix}`;
  }

  result(appId, requestId) {
    return this.json(this.requestPath(appId, requestId));
  }

  status(appId, requestId) {
    return this.json(this.requestPath(appId, requestId, "/status?logs=1"));
  }

  /** PUT cancel: true when asked (202), false when it had already completed (400). */
  async cancel(appId, requestId) {
    const response = await this.fetch(this.requestPath(appId, requestId, "/cancel"), { method: "PUT" });
    if (response.ok) return true;
    const error = await errorFrom(response);
    if (response.status === 400 && error.body && error.body.status === "ALREADY_COMPLETED") return false;
    throw error;
  }

  /** The status stream's events (server-sent events: logs are deltas). */
  async *statusEvents(appId, requestId, signal) {
    const path = this.requestPath(appId, requestId, "/status/stream?logs=1");
    const response = await this.fetch(path, { signal, headers: { Accept: "text/event-stream" } });
    if (!response.ok) throw await errorFrom(response);
    yield* sseEvents(response);
  }

  recent(limit = 20) {
    return this.json(`/queue/requests?limit=${limit}`);
  }
}

/** Parse a text/event-stream body: yields each event's `data` as JSON (comments and other fields skipped). */
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (data.length) yield JSON.parse(data.join("\n"));
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
  if (data.length) yield JSON.parse(data.join("\n"));
}

/** The apps this server serves, from its OpenAPI document: id, input schema (resolved) and step variants. */
export function appsOf(openapi) {
  const schemas = (openapi.components || {}).schemas || {};
  const resolve = (schema) => (schema && schema.$ref ? schemas[schema.$ref.split("/").pop()] : schema);
  const apps = [];
  for (const [path, item] of Object.entries(openapi.paths || {})) {
    const match = /^\/queue\/([^{}]+\/[^{}]+\/[^{}]+)$/.exec(path);
    if (!match || !item.post || !item.post.requestBody) continue;
    const schema = resolve(item.post.requestBody.content["application/json"].schema);
    const properties = {};
    for (const [name, property] of Object.entries(schema.properties || {})) properties[name] = property;
    const steps = (properties.num_inference_steps || {}).enum || [];
    apps.push({
      id: match[1],
      label: familyLabel(match[1]),
      schema,
      properties,
      resolve,
      steps,
      streams: Boolean(openapi.paths[`/${match[1]}/stream`]),
    });
  }
  return apps;
}

/** "Hyper", "Lightning" or the alias: how a variant is named in the page. */
export function familyLabel(appId) {
  const alias = appId.split("/")[1] || appId;
  if (alias.includes("hyper")) return "Hyper";
  if (alias.includes("lightning")) return "Lightning";
  return alias;
}

/** Every (app, steps) pair the server serves: the variants the side-by-side view offers. */
export function variantsOf(apps) {
  return apps.flatMap((app) =>
    app.steps.map((steps) => ({ appId: app.id, steps, label: `${app.label} ${steps} step${steps === "1" ? "" : "s"}` })),
  );
}
