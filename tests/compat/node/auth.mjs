// API keys through the proxy protocol (@fal-ai/client): a wrong key, no key, and the right key.
// Usage: node auth.mjs --base URL --image PNG --mask PNG --key RIGHT_KEY --other ANOTHER_VALID_KEY
// Prints one JSON line of observations.

import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

import { HYPER, LIGHTNING, SIZE, attempt, deadline, options, pngBlob, recordingFetch, report } from "./common.mjs";
import { briefOutput } from "./scenario.mjs";

deadline(30000);
const opts = options();
const recorder = recordingFetch(opts.base);
globalThis.fetch = recorder.fetch;
const classes = { ApiError, ValidationError };
const proxyUrl = { url: `${opts.base}/api/fal/proxy`, when: "always" };
const client = (credentials) => createFalClient({ credentials, proxyUrl });
const input = () => ({
  image_url: pngBlob(opts.image),
  mask_url: pngBlob(opts.mask),
  prompt: "a red apple",
  image_size: SIZE,
});

const wrong = client(`${opts.key}-wrong`);
const none = client(undefined);
const right = client(opts.key);
const other = client(opts.other);
const obs = {};
obs.wrongRun = await attempt(() => wrong.run(HYPER, { input: input() }), classes);
obs.wrongSubmit = await attempt(
  () => wrong.queue.submit(LIGHTNING, { input: { image_url: "data:,", mask_url: "data:,", prompt: "x" } }),
  classes,
);
obs.noKeyRun = await attempt(() => none.run(HYPER, { input: input() }), classes);
obs.rightRun = await attempt(async () => {
  const { data, requestId } = await right.run(HYPER, { input: input() });
  return { requestId, data: briefOutput(data) };
}, classes);
obs.rightSubscribe = await attempt(async () => {
  let enqueued = null;
  const { data, requestId } = await right.subscribe(LIGHTNING, {
    input: { ...input(), num_inference_steps: "1" },
    mode: "streaming",
    onEnqueue: (id) => {
      enqueued = id;
    },
  });
  // Another valid key does not see this request; a wrong key is refused.
  const foreign = await attempt(() => other.queue.status(LIGHTNING, { requestId }), classes);
  const wrongKeyStatus = await attempt(() => wrong.queue.status(LIGHTNING, { requestId }), classes);
  return { enqueued, requestId, data: briefOutput(data), foreign, wrongKeyStatus };
}, classes);
report({ ...obs, calls: recorder.calls });
