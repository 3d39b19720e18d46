// One request, start to end: through the step-preview stream (POST /{app}/stream) when the server has it, else
// through the queue (submit, status stream with logs, result). Either way its request id is known early, so it
// can be cancelled with the queue's cancel route, and its errors are the server's own messages.

import { ApiError, errorFrom, sseEvents } from "./api.js";

const STEP_LOG = /^Step (\d+)\/(\d+)/;

/**
 * Run `input` on `appId`. `ui` gets: requestId(id), queued(position), started(), progress(step, total),
 * log(entry), preview(image, step, total). Resolves with {output, requestId, latencyMs}; rejects with ApiError.
 */
export class Run {
  constructor(api, appId, input, ui, { previews = false } = {}) {
    this.api = api;
    this.appId = appId;
    this.input = input;
    this.ui = ui;
    this.previews = previews;
    this.requestId = null;
    this.cancelWanted = false;
    this.controller = new AbortController();
  }

  async start() {
    const started = performance.now();
    let output = null;
    if (this.previews) {
      try {
        output = await this.viaPreviewStream();
      } catch (error) {
        if (error.name === "AbortError" && this.cancelWanted && !this.requestId) {
          throw new ApiError("cancelled before it started (the stream was closed)");
        }
        throw error;
      }
    }
    if (output === null && this.requestId === null) output = await this.viaQueue();
    return { output, requestId: this.requestId, latencyMs: performance.now() - started };
  }

  /**
   * Ask the server to stop it: by the queue's cancel route once its id is known; before that, a submit sends the
   * cancel as soon as the id comes back, and a preview stream still waiting for its first event is closed, which
   * cancels it on the server.
   */
  async cancel() {
    this.cancelWanted = true;
    if (this.requestId) return this.api.cancel(this.appId, this.requestId);
    if (this.previews) this.controller.abort();
    return true;
  }

  async gotId(id) {
    if (this.requestId) return;
    this.requestId = id;
    this.ui.requestId(id);
    if (this.cancelWanted) await this.api.cancel(this.appId, id).catch(() => {});
  }

  async viaQueue() {
    const submitted = await this.api.submit(this.appId, this.input);
    await this.gotId(submitted.request_id);
    this.ui.queued(submitted.queue_position ?? 0);
    try {
      await this.follow(this.controller.signal);
    } catch (error) {
      if (error instanceof ApiError) throw error;
      await this.poll(); // the stream broke (a proxy, a restart): poll the status instead
    }
    return this.api.result(this.appId, this.requestId);
  }

  /** Follow the status stream until COMPLETED: queue position, start, logs (deltas) and the steps they report. */
  async follow(signal) {
    for await (const status of this.api.statusEvents(this.appId, this.requestId, signal)) {
      this.status(status);
      if (status.status === "COMPLETED") return;
    }
  }

  async poll() {
    let seen = 0;
    for (;;) {
      const status = await this.api.status(this.appId, this.requestId);
      const logs = status.logs || [];
      this.status({ ...status, logs: logs.slice(seen) });
      seen = logs.length;
      if (status.status === "COMPLETED") return;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }

  status(status) {
    if (status.status === "IN_QUEUE") this.ui.queued(status.queue_position ?? 0);
    if (status.status === "IN_PROGRESS") this.ui.started();
    for (const entry of status.logs || []) {
      this.ui.log(entry);
      const step = STEP_LOG.exec(entry.message || "");
      if (step) this.ui.progress(Number(step[1]), Number(step[2]));
    }
  }

  /**
   * POST /{app}/stream: progress events with previews, then the output. null when the server has no such route
   * (404/405: the caller falls back to the queue). Logs come from the request's status stream alongside.
   */
  async viaPreviewStream() {
    const response = await this.api.fetch(`/${this.appId}/stream`, {
      method: "POST",
      body: JSON.stringify(this.input),
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      signal: this.controller.signal,
    });
    if (response.status === 404 || response.status === 405) {
      this.previews = false; // no such route here: the queue it is
      return null;
    }
    if (!response.ok) throw await errorFrom(response);
    const logs = new AbortController();
    const known = async (id) => {
      if (!id || this.requestId) return;
      await this.gotId(id);
      this.follow(logs.signal).catch(() => {}); // logs only; the preview stream carries the rest
    };
    let output = null;
    let failure = null;
    try {
      await known(response.headers.get("x-fal-request-id"));
      for await (const event of sseEvents(response)) {
        await known(event.request_id);
        if (event.status === "IN_QUEUE") this.ui.queued(event.queue_position ?? 0);
        if (typeof event.step === "number") {
          this.ui.started();
          this.ui.progress(event.step, event.total_steps);
          const preview = (event.previews || [])[0];
          if (preview) this.ui.preview(preview, event.step, event.total_steps);
        }
        if (Array.isArray(event.images)) output = event;
        else if (event.detail !== undefined || event.error !== undefined) failure = event;
      }
    } finally {
      setTimeout(() => logs.abort(), 300); // the last log lines may still be on their way
    }
    if (output) return output;
    if (this.requestId) return this.api.result(this.appId, this.requestId); // the stored outcome (a cancel, an error)
    const message = failure ? failure.detail ?? failure.error : "the stream ended without a result";
    throw new ApiError(typeof message === "string" ? message : JSON.stringify(message));
  }
}
