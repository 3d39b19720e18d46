// One headless Chromium for a whole test module, driven with playwright-core.
//
// The Python test starts this script once and sends it one JSON command per line on stdin:
//   {"id": 1, "scenario": "paint_and_submit", "args": {...}}
// Each scenario (scenarios.mjs) runs in a fresh browser context (its own localStorage and IndexedDB) and the
// answer is one JSON line on stdout: {"id": 1, "value": ...} or {"id": 1, "error": "...", "screenshot": path}.
// Every request any page makes is recorded (the command "requests" returns them all): the test checks that
// none went to a host other than the server.
//
//   node driver.mjs --base http://127.0.0.1:PORT --artifacts DIR [--chromium /usr/bin/chromium]

import { mkdirSync } from "node:fs";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";

import { chromium } from "../compat/node/node_modules/playwright-core/index.mjs";

import * as scenarios from "./scenarios.mjs";

const { values } = parseArgs({
  options: {
    base: { type: "string" },
    artifacts: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
const base = values.base.replace(/\/+$/, "");
mkdirSync(values.artifacts, { recursive: true });

const browser = await chromium.launch({
  executablePath: values.chromium,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider",
  ],
});

const requests = [];
const pageErrors = []; // uncaught exceptions and console.error() of the pages (not failed loads: 4xx answers)
let open = []; // the contexts of the scenario running now (closed after it)
let lastPage = null;

/** A fresh context and page at `viewport`, recording every request and every page error. */
async function newPage(viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport, acceptDownloads: false });
  context.on("request", (request) => requests.push({ url: request.url(), method: request.method() }));
  open.push(context);
  const page = await context.newPage();
  lastPage = page;
  page.on("pageerror", (error) => pageErrors.push(`${page.url()}: ${error.message}`));
  page.on("console", (message) => {
    const text = message.text();
    if (message.type() === "error" && !text.startsWith("Failed to load resource")) pageErrors.push(`${page.url()}: ${text}`);
  });
  page.setDefaultTimeout(20000);
  return { context, page };
}

const env = { base, artifacts: values.artifacts, newPage };

function reply(message) {
  process.stdout.write(`${JSON.stringify(message)}\n`);
}

reply({ ready: true, version: browser.version() });

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const { id, scenario, args } = JSON.parse(line);
  if (scenario === "requests") {
    reply({ id, value: { requests, pageErrors } });
    continue;
  }
  if (scenario === "quit") {
    reply({ id, value: true });
    break;
  }
  const run = scenarios[scenario];
  if (!run) {
    reply({ id, error: `no scenario ${scenario}` });
    continue;
  }
  try {
    reply({ id, value: await run(env, args || {}) });
  } catch (error) {
    const screenshot = `${values.artifacts}/${scenario}-failure.png`;
    const shot = lastPage ? await lastPage.screenshot({ path: screenshot, fullPage: true }).catch(() => null) : null;
    reply({ id, error: `${error.message}\n${error.stack}`, screenshot: shot ? screenshot : null });
  } finally {
    await Promise.all(open.map((context) => context.close().catch(() => {})));
    open = [];
    lastPage = null;
  }
}
await browser.close();
process.exit(0); // stdin (the readline interface) would keep the process alive
