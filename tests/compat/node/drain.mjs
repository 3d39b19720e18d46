// @fal-ai/client while the server drains for a deploy (SIGTERM): a queue submit is taken, status and
// cancel answer; then the client waits for the request across the restart (its polls retry the refused
// connections) and reads the result from the restarted server.
// Usage: node drain.mjs --base URL --image PNG --mask PNG
// Prints "EVENT submitted" once the submits are done (the test then lets the server finish draining and
// restarts it), and finally one JSON line of observations.

import { readFileSync } from "node:fs";

import { ApiError, createFalClient } from "@fal-ai/client";

import { LIGHTNING, SIZE, attempt, brief, deadline, options, recordingFetch, report, rewriter } from "./common.mjs";

deadline(50000);
const opts = options();
const recorder = recordingFetch(opts.base, rewriter(opts.base));
const fal = createFalClient({ credentials: "any-key", fetch: recorder.fetch });
const classes = { ApiError };
const dataUri = (path) => `data:image/png;base64,${readFileSync(path).toString("base64")}`;
const input = (seed) => ({
  image_url: dataUri(opts.image),
  mask_url: dataUri(opts.mask),
  prompt: "a lighthouse at dusk",
  image_size: SIZE,
  num_inference_steps: "2",
  seed,
});
const status = async (requestId) => brief(await fal.queue.status(LIGHTNING, { requestId, logs: true }));

const obs = {};
obs.submit = await attempt(() => fal.queue.submit(LIGHTNING, { input: input(21) }), classes);
const id = obs.submit.value?.request_id;
obs.status = await attempt(() => status(id), classes);
obs.cancelled = await attempt(async () => {
  const other = await fal.queue.submit(LIGHTNING, { input: input(22) });
  await fal.queue.cancel(LIGHTNING, { requestId: other.request_id });
  return { id: other.request_id, status: await status(other.request_id) };
}, classes);
process.stdout.write("EVENT submitted\n");
if (id) {
  obs.final = await attempt(async () => {
    const done = await fal.queue.subscribeToStatus(LIGHTNING, { requestId: id, mode: "polling", pollInterval: 100 });
    const result = await fal.queue.result(LIGHTNING, { requestId: id });
    return { status: brief(done), seed: result.data.seed, requestId: result.requestId };
  }, classes);
}
report({ ...obs, calls: recorder.calls });
