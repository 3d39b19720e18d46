// @fal-ai/client's storage against the server through the proxy protocol:
//   * a Blob over the client's 90 MB threshold, which it uploads in parts (initiate-multipart, PUT per 10 MB
//     part, complete);
//   * a small Blob with a lifecycle (`lifecycle: {expiresIn: 1}`: the X-Fal-Object-Lifecycle header);
//   * a queue submit with `storageSettings: {expiresIn: 1}` (X-Fal-Object-Lifecycle-Preference) for its outputs.
// Usage: node storage.mjs --base URL --image PNG --mask PNG --size BYTES
// Prints one JSON line: the URLs, the big Blob's size and SHA-256, and the calls that went over the wire.

import { createHash, randomFillSync } from "node:crypto";

import { createFalClient } from "@fal-ai/client";

import { LIGHTNING, SIZE, attempt, deadline, options, pngBlob, recordingFetch, report } from "./common.mjs";

deadline(50000);
const opts = options({ size: { type: "string" } });
const recorder = recordingFetch(opts.base);
globalThis.fetch = recorder.fetch;
const fal = createFalClient({
  credentials: opts.key || "any-key",
  proxyUrl: { url: `${opts.base}/api/fal/proxy`, when: "always" },
});

const size = Number(opts.size);
const bytes = randomFillSync(new Uint8Array(size)); // every part differs: one out of place changes the digest
const sha256 = createHash("sha256").update(bytes).digest("hex");
const started = Date.now();
const big = await attempt(() => fal.storage.upload(new Blob([bytes], { type: "application/octet-stream" })));
const bigSeconds = (Date.now() - started) / 1000;

const short = await attempt(() => fal.storage.upload(pngBlob(opts.image), { lifecycle: { expiresIn: 1 } }));
const submitted = await attempt(() =>
  fal.queue.submit(LIGHTNING, {
    input: {
      image_url: pngBlob(opts.image),
      mask_url: pngBlob(opts.mask),
      prompt: "a lighthouse",
      image_size: SIZE,
      num_inference_steps: "2",
    },
    storageSettings: { expiresIn: 1 },
  }),
);

report({ big, bigSeconds, size, sha256, short, submitted, calls: recorder.calls });
