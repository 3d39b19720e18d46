// fal.subscribe(..., { mode: "streaming" }) of @fal-ai/client through a proxy that cuts connections idle
// for longer than its timeout (the test's IdleCuttingProxy), while the request waits in the queue.
// Usage: node stream_idle.mjs --base URL(of the proxy) --image PNG --mask PNG
// Prints one JSON line: the outcome ({value} or {error}), the status updates with their times, the calls.

import { readFileSync } from "node:fs";

import { ApiError, createFalClient } from "@fal-ai/client";

import { LIGHTNING, SIZE, attempt, brief, deadline, options, recordingFetch, report, rewriter } from "./common.mjs";

deadline(30000);
const opts = options();
const recorder = recordingFetch(opts.base, rewriter(opts.base));
const fal = createFalClient({ credentials: "any-key", fetch: recorder.fetch });
const dataUri = (path) => `data:image/png;base64,${readFileSync(path).toString("base64")}`;

const started = Date.now();
const updates = [];
const outcome = await attempt(async () => {
  const result = await fal.subscribe(LIGHTNING, {
    input: {
      image_url: dataUri(opts.image),
      mask_url: dataUri(opts.mask),
      prompt: "a lighthouse at dusk",
      image_size: SIZE,
      num_inference_steps: "2",
      seed: 7,
    },
    mode: "streaming",
    logs: true,
    onQueueUpdate: (update) => updates.push({ ...brief(update), atMs: Date.now() - started }),
  });
  return { seed: result.data.seed, images: result.data.images.length, requestId: result.requestId };
}, { ApiError });
report({ outcome, updates, calls: recorder.calls });
