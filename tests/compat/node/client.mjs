// @fal-ai/client (1.x) against the server, through one of two transports:
//   --transport proxy : createFalClient({credentials, proxyUrl: {url: <base>/api/fal/proxy, when: "always"}})
//                       (the client's own fetch is Node's global fetch; a pass-through recorder is
//                       installed as the global fetch only to observe the wire)
//   --transport fetch : createFalClient({credentials, fetch}) where fetch rewrites fal's hosts onto
//                       <base>/, <base>/queue/ and <base>/rest/
// Usage: node client.mjs --base URL --hook URL --image PNG --mask PNG [--key KEY] --transport proxy|fetch
// Prints one JSON line of observations.

import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

import { deadline, options, recordingFetch, report, rewriter } from "./common.mjs";
import { runScenario } from "./scenario.mjs";

deadline(50000);
const opts = options();
const transport = opts.transport || "proxy";
let fal;
let recorder;
if (transport === "proxy") {
  recorder = recordingFetch(opts.base);
  globalThis.fetch = recorder.fetch;
  fal = createFalClient({
    credentials: opts.key || "any-key",
    proxyUrl: { url: `${opts.base}/api/fal/proxy`, when: "always" },
  });
} else if (transport === "fetch") {
  recorder = recordingFetch(opts.base, rewriter(opts.base));
  fal = createFalClient({ credentials: opts.key || "any-key", fetch: recorder.fetch });
} else {
  throw new Error(`unknown --transport ${transport}`);
}

const obs = await runScenario(
  { fal, classes: { ApiError, ValidationError }, unwrap: (r) => ({ data: r.data, requestId: r.requestId }) },
  opts,
);
report({ client: "@fal-ai/client", transport, ...obs, calls: recorder.calls });
