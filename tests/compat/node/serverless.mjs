// The deprecated @fal-ai/serverless-client (0.15) against the server. Its proxyUrl does nothing
// outside browsers, so Node users point it elsewhere with a request middleware:
//   fal.config({credentials, requestMiddleware: async (r) => ({...r, url: rewrite(r.url)})})
// The upload PUT does not go through the middleware; it goes to the server's upload_url as is.
// A pass-through recorder is installed as the global fetch only to observe the wire.
// Usage: node serverless.mjs --base URL --hook URL --image PNG --mask PNG [--key KEY]
// Prints one JSON line of observations.

import * as fal from "@fal-ai/serverless-client";

import { deadline, options, recordingFetch, report, rewriter } from "./common.mjs";
import { runScenario } from "./scenario.mjs";

deadline(50000);
const opts = options();
const recorder = recordingFetch(opts.base);
globalThis.fetch = recorder.fetch;
const rewrite = rewriter(opts.base);
fal.config({ credentials: opts.key || "any-key", requestMiddleware: async (r) => ({ ...r, url: rewrite(r.url) }) });

const obs = await runScenario(
  // This client returns the bare output and knows no request ids.
  {
    fal,
    classes: { ApiError: fal.ApiError, ValidationError: fal.ValidationError },
    unwrap: (r) => ({ data: r, requestId: null }),
  },
  opts,
);
report({ client: "@fal-ai/serverless-client", transport: "requestMiddleware", ...obs, calls: recorder.calls });
