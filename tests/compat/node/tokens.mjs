// Temporary tokens with @fal-ai/client (a browser app that never holds the API key):
//   1. the app's backend mints a token with the key: POST /tokens/ (what a tokenProvider would call);
//   2. the "browser" client has no credentials: a requestMiddleware sends "Authorization: Bearer <token>"
//      on every call (uploads, submit, result, cancel), and subscribe({mode: "streaming",
//      connectionMode: "client"}) makes the client mint its own token (POST rest.fal.ai/tokens/ with
//      the bearer token) and stream the status with ?fal_jwt_token=, without any header;
//   3. the key sees the browser's request, and its own connectionMode "client" stream mints with the key.
// Usage: node tokens.mjs --base URL --image PNG --mask PNG --key KEY
// Prints one JSON line of observations.

import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

import {
  HYPER,
  LIGHTNING,
  SIZE,
  attempt,
  brief,
  deadline,
  options,
  pngBlob,
  recordingFetch,
  report,
  rewriter,
} from "./common.mjs";
import { briefOutput } from "./scenario.mjs";

deadline(40000);
const opts = options();
const recorder = recordingFetch(opts.base, rewriter(opts.base));
const classes = { ApiError, ValidationError };
const obs = {};

const minted = await recorder.fetch(`${opts.base}/tokens/`, {
  method: "POST",
  headers: { authorization: `Key ${opts.key}`, "content-type": "application/json" },
  body: JSON.stringify({ allowed_apps: ["fal-ai/fast-lightning-sdxl"], token_expiration: 300 }),
});
const token = await minted.json();
obs.tokenType = typeof token;

const browser = createFalClient({
  fetch: recorder.fetch,
  requestMiddleware: async (request) => ({
    ...request,
    headers: { ...request.headers, authorization: `Bearer ${token}` },
  }),
});
obs.subscribe = await attempt(async () => {
  const updates = [];
  let enqueued = null;
  const { data, requestId } = await browser.subscribe(LIGHTNING, {
    input: {
      image_url: pngBlob(opts.image),
      mask_url: pngBlob(opts.mask),
      prompt: "a red apple",
      image_size: SIZE,
      num_inference_steps: "2",
    },
    mode: "streaming",
    connectionMode: "client",
    logs: true,
    onEnqueue: (id) => {
      enqueued = id;
    },
    onQueueUpdate: (update) => updates.push(brief(update)),
  });
  return { enqueued, requestId, data: briefOutput(data), updates };
}, classes);
const requestId = obs.subscribe.value?.requestId;
obs.cancel = await attempt(() => browser.queue.cancel(LIGHTNING, { requestId }), classes);
obs.otherApp = await attempt(
  () => browser.queue.submit(HYPER, { input: { image_url: "data:,", mask_url: "data:,", prompt: "x" } }),
  classes,
);

const keyed = createFalClient({ credentials: opts.key, fetch: recorder.fetch });
obs.keyStatus = await attempt(async () => brief(await keyed.queue.status(LIGHTNING, { requestId })), classes);
obs.keyStream = await attempt(async () => {
  const stream = await keyed.queue.streamStatus(LIGHTNING, { requestId, connectionMode: "client" });
  return brief(await stream.done());
}, classes);
report({ ...obs, calls: recorder.calls });
