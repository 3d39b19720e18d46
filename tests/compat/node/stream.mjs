// fal.stream(...) of @fal-ai/client against POST /{app}/stream (step previews over server-sent events):
//   1. through the proxy protocol with the API key, Blob inputs (uploaded first), iterating the events;
//   2. an input that is not an image: done() rejects with the server's error;
//   3. connectionMode "client" (a browser without the key): a tokenProvider gives a token the backend minted,
//      the client streams with ?fal_jwt_token= and no Authorization header (custom fetch onto the server).
// Usage: node stream.mjs --base URL --image PNG --mask PNG --key KEY
// Prints one JSON line of observations.

import { readFileSync } from "node:fs";

import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

import { LIGHTNING, SIZE, attempt, deadline, options, pngBlob, recordingFetch, report, rewriter } from "./common.mjs";

deadline(40000);
const opts = options();
const classes = { ApiError, ValidationError };
const dataUri = (path) => `data:image/png;base64,${readFileSync(path).toString("base64")}`;
const input = (overrides = {}) => ({
  image_url: dataUri(opts.image),
  mask_url: dataUri(opts.mask),
  prompt: "a lighthouse at dusk",
  image_size: SIZE,
  num_inference_steps: "2",
  ...overrides,
});

/** Every event the iterator yields, then what done() resolves with. done() is asked for first: the client
 * rejects it as soon as an error arrives, and Node ends the process on a rejection nobody listens to yet. */
async function streamAll(stream) {
  const done = stream.done();
  done.catch(() => {});
  const events = [];
  for await (const event of stream) events.push(event);
  return { events, done: await done, requestId: stream.requestId };
}

const obs = {};
const proxied = recordingFetch(opts.base);
globalThis.fetch = proxied.fetch;
const fal = createFalClient({ credentials: opts.key, proxyUrl: { url: `${opts.base}/api/fal/proxy`, when: "always" } });

obs.stream = await attempt(async () => {
  const stream = await fal.stream(LIGHTNING, {
    input: { ...input({ num_images: 2, seed: 9 }), image_url: pngBlob(opts.image), mask_url: pngBlob(opts.mask) },
  });
  return streamAll(stream);
}, classes);

obs.notAnImage = await attempt(async () => {
  const stream = await fal.stream(LIGHTNING, {
    input: input({ image_url: `data:image/png;base64,${Buffer.from("not an image").toString("base64")}` }),
  });
  return streamAll(stream);
}, classes);

// A browser: no key; its backend minted a token for the app.
const minted = await proxied.fetch(`${opts.base}/tokens/`, {
  method: "POST",
  headers: { authorization: `Key ${opts.key}`, "content-type": "application/json" },
  body: JSON.stringify({ allowed_apps: ["fast-lightning-sdxl"], token_expiration: 300 }),
});
const token = await minted.json();
const direct = recordingFetch(opts.base, rewriter(opts.base));
const browser = createFalClient({ fetch: direct.fetch });
const asked = [];
obs.clientMode = await attempt(async () => {
  const stream = await browser.stream(LIGHTNING, {
    input: input({ num_inference_steps: "1" }),
    connectionMode: "client",
    tokenProvider: async (app) => {
      asked.push(app);
      return token;
    },
  });
  return streamAll(stream);
}, classes);
obs.tokenAskedFor = asked;
report({ ...obs, calls: [...proxied.calls, ...direct.calls] });
