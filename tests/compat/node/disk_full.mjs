// A full disk (issue 13, item 22) as @fal-ai/client sees it through the proxy protocol: a queue submit and a
// Blob upload each get 507 insufficient_storage with the server's reason, at once (507 is not retried).
// Usage: node disk_full.mjs --base URL --image PNG --key KEY
// Prints one JSON line of observations.

import { readFileSync } from "node:fs";

import { ApiError, createFalClient } from "@fal-ai/client";

import { LIGHTNING, SIZE, attempt, deadline, options, pngBlob, recordingFetch, report } from "./common.mjs";

deadline(20000);
const opts = options();
const recorder = recordingFetch(opts.base);
globalThis.fetch = recorder.fetch;
const fal = createFalClient({ credentials: opts.key, proxyUrl: { url: `${opts.base}/api/fal/proxy`, when: "always" } });
const image = `data:image/png;base64,${readFileSync(opts.image).toString("base64")}`;
const classes = { ApiError };
const started = Date.now();
const obs = {};
obs.submit = await attempt(
  () => fal.queue.submit(LIGHTNING, { input: { image_url: image, mask_url: image, prompt: "x", image_size: SIZE } }),
  classes,
);
obs.upload = await attempt(() => fal.storage.upload(pngBlob(opts.image)), classes);
obs.elapsedMs = Date.now() - started;
obs.calls = recorder.calls.map((call) => ({ method: call.method, target: call.target, status: call.status }));
report(obs);
