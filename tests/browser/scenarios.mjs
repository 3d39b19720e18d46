// What a person does on the pages, step by step, with Playwright: controls are found by their accessible role
// or label (as a screen reader would), the mask is painted with mouse events. Each scenario returns what it saw;
// the assertions are in test_playground.py. Screenshots of each state go to the artefacts folder.

import { readFileSync } from "node:fs";
import { basename } from "node:path";

const LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting";

async function shot(env, page, name) {
  const path = `${env.artifacts}/${name}.png`;
  await page.screenshot({ path, fullPage: true });
  return path;
}

/** The playground with the key typed in and `image` picked: ready to paint. */
async function openPlayground(env, { key, image, viewport } = {}) {
  const { page } = await env.newPage(viewport);
  await page.goto(`${env.base}/`);
  await page.waitForSelector("body[data-ready=true]");
  if (key) await page.getByLabel("API key", { exact: true }).fill(key);
  if (image) {
    await page.getByLabel("Image", { exact: true }).setInputFiles(image);
    await page.locator("#canvas-box").waitFor({ state: "visible" });
  }
  return page;
}

/** Small, quick inputs: 64x64 PNG output, few steps, a fixed seed. */
async function smallInputs(page, { app = LIGHTNING, steps = "2", seed = "1234", prompt = "a red door" } = {}) {
  await page.getByLabel("App", { exact: true }).selectOption(app);
  await page.getByLabel("Prompt", { exact: true }).fill(prompt);
  await page.getByLabel("Num inference steps", { exact: true }).selectOption(steps);
  await page.getByLabel("Image size", { exact: true }).selectOption("custom");
  await page.getByLabel("Width", { exact: true }).fill("64");
  await page.getByLabel("Height", { exact: true }).fill("64");
  await page.getByLabel("Format", { exact: true }).selectOption("png");
  if (seed !== null) await page.getByLabel("Seed", { exact: true }).fill(seed);
}

/**
 * Paint one stroke with the mouse from `from` to `to` (fractions of the mask canvas) with a brush of `brush`
 * image pixels. Returns the stroke in image pixels.
 */
async function paint(page, from, to, brush = 8) {
  const slider = page.getByLabel("Brush size", { exact: true });
  await slider.fill(String(brush));
  const canvas = page.getByRole("img", { name: /^Mask/ });
  await canvas.scrollIntoViewIfNeeded(); // the mouse reaches only what is in the viewport
  const box = await canvas.boundingBox();
  const size = await canvas.evaluate((c) => ({ width: c.width, height: c.height }));
  const at = ([fx, fy]) => [box.x + fx * box.width, box.y + fy * box.height];
  const [x0, y0] = at(from);
  const [x1, y1] = at(to);
  await page.mouse.move(x0, y0);
  await page.mouse.down();
  await page.mouse.move(x1, y1, { steps: 12 });
  await page.mouse.up();
  const image = ([fx, fy]) => [fx * size.width, fy * size.height];
  return { from: image(from), to: image(to), brush, canvas: size };
}

/** Record what the run panel shows as it changes (progress, previews, status), from now on. */
async function watchRunPanel(page) {
  await page.evaluate(() => {
    const seen = { progress: [], previews: [], status: [] };
    window.__seen = seen;
    const watch = (id, list) => {
      const node = document.getElementById(id);
      new MutationObserver(() => {
        const text = node.textContent;
        if (text && list[list.length - 1] !== text) list.push(text);
      }).observe(node, { childList: true, characterData: true, subtree: true });
    };
    watch("progress-text", seen.progress);
    watch("preview-caption", seen.previews);
    watch("run-status", seen.status);
    const preview = document.getElementById("preview");
    seen.previewSources = 0;
    new MutationObserver(() => {
      seen.previewSources += 1;
    }).observe(preview, { attributes: true, attributeFilter: ["src"] });
  });
}

/** The JSON bodies of the page's submits (queue or preview stream). */
function recordSubmits(page) {
  const bodies = [];
  page.on("request", (request) => {
    if (request.method() === "POST" && /\/fal-ai\//.test(request.url())) {
      bodies.push({ url: request.url(), body: JSON.parse(request.postData() || "null") });
    }
  });
  return bodies;
}

async function resultImage(page) {
  const image = page.getByRole("img", { name: "Result 1" });
  await image.waitFor({ state: "visible" });
  await page.waitForFunction(() => {
    const img = document.querySelector("#results img");
    return img && img.complete && img.naturalWidth > 0;
  });
  return image.evaluate((img) => ({ src: img.src, width: img.naturalWidth, height: img.naturalHeight }));
}

/** Load, pick an image, paint a stroke, submit, watch it run, and read the result. */
export async function paint_and_submit(env, { key, image }) {
  const page = await openPlayground(env, { key, image });
  const screenshots = [await shot(env, page, "1-loaded")];
  await smallInputs(page);
  const stroke = await paint(page, [0.2, 0.5], [0.8, 0.5]);
  screenshots.push(await shot(env, page, "2-painted"));
  const submits = recordSubmits(page);
  await watchRunPanel(page);
  await page.getByRole("button", { name: "Generate" }).click();
  const result = await resultImage(page);
  screenshots.push(await shot(env, page, "3-result"));
  const seen = await page.evaluate(() => window.__seen);
  const logs = await page.getByRole("list", { name: "Logs" }).locator("li").allTextContents();
  const facts = await page.locator(".facts").innerText();
  const download = await page.getByRole("link", { name: "Download" }).getAttribute("href");
  const keyKept = await page.evaluate(() => localStorage.getItem("inpaint-server.api-key"));
  // The result is kept in this browser: after a reload, the before/after view shows it.
  await page.reload();
  await page.waitForSelector("body[data-ready=true]");
  await page.getByRole("img", { name: "After (the result)" }).waitFor({ state: "visible" });
  await page.getByLabel("Before/after", { exact: true }).fill("20");
  const clip = await page.getByRole("img", { name: "After (the result)" }).evaluate((img) => img.style.clipPath);
  const history = await page.getByLabel("Result", { exact: true }).locator("option").allTextContents();
  const keyAfterReload = await page.getByLabel("API key", { exact: true }).inputValue();
  screenshots.push(await shot(env, page, "4-before-after"));
  return { stroke, submits, result, seen, logs, facts, download, keyKept, keyAfterReload, clip, history, screenshots };
}

/**
 * Submit with the engine held after its first step, press Cancel, and read what the page says. `previews`: through
 * the step-preview stream (else the queue's path: submit, status stream, cancel).
 */
export async function cancel_running(env, { key, image, previews }) {
  const page = await openPlayground(env, { key, image });
  await smallInputs(page, { steps: "4" });
  const option = page.getByLabel("Step previews", { exact: true });
  if (previews) await option.check();
  else if (await option.isVisible()) await option.uncheck();
  await paint(page, [0.3, 0.3], [0.7, 0.7]);
  await page.getByRole("button", { name: "Generate" }).click();
  await page.getByText("Step 1 of 4", { exact: true }).waitFor();
  const running = await page.getByRole("status", { name: "Run status" }).textContent();
  const screenshots = [await shot(env, page, `5-running${previews ? "-previews" : ""}`)];
  await page.getByRole("button", { name: "Cancel" }).click();
  const alert = page.getByRole("alert");
  await alert.waitFor({ state: "visible" });
  screenshots.push(await shot(env, page, `6-cancelled${previews ? "-previews" : ""}`));
  const logs = await page.getByRole("list", { name: "Logs" }).locator("li").allTextContents();
  return {
    running,
    error: await alert.innerText(),
    status: await page.getByRole("status", { name: "Run status" }).textContent(),
    generateEnabled: await page.getByRole("button", { name: "Generate" }).isEnabled(),
    logs,
    screenshots,
  };
}

/** A file that is no image: the page sends it and shows what the server says. */
export async function bad_input(env, { key, notImage }) {
  const page = await openPlayground(env, { key, image: notImage });
  const info = await page.locator("#image-info").innerText();
  await smallInputs(page);
  await paint(page, [0.3, 0.3], [0.6, 0.6]);
  await page.getByRole("button", { name: "Generate" }).click();
  const alert = page.getByRole("alert");
  await alert.waitFor({ state: "visible" });
  const error = (await alert.innerText()).trim();
  const screenshots = [await shot(env, page, "7-bad-input")];
  // An invalid field is refused at submit (422): the page lists the server's detail messages.
  await page.getByLabel("Num images", { exact: true }).fill("0");
  await page.getByRole("button", { name: "Generate" }).click();
  await page.waitForFunction(() => document.querySelector("[role=alert]").textContent.includes("num_images"));
  screenshots.push(await shot(env, page, "8-invalid-field"));
  return {
    info,
    error,
    invalid: (await page.getByRole("alert").innerText()).trim(),
    prompt: await page.getByLabel("Prompt", { exact: true }).inputValue(),
    screenshots,
  };
}

/** The image dropped on the page (a drop event carrying the file), then the mask tools: paint, erase, undo,
 * invert, clear, with the share of the image to repaint after each. */
export async function mask_tools(env, { image }) {
  const page = await openPlayground(env);
  const dataTransfer = await page.evaluateHandle(
    ({ bytes, name }) => {
      const transfer = new DataTransfer();
      transfer.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
      return transfer;
    },
    { bytes: [...readFileSync(image)], name: basename(image) },
  );
  await page.dispatchEvent("#drop-zone", "drop", { dataTransfer });
  await page.locator("#canvas-box").waitFor({ state: "visible" });
  const dropped = await page.locator("#image-info").innerText();
  const share = async () => {
    const text = await page.locator("#image-info").innerText();
    const match = /([\d.]+) % to repaint/.exec(text);
    return match ? Number(match[1]) : 0;
  };
  const shares = { start: await share() };
  await paint(page, [0.1, 0.5], [0.9, 0.5], 16);
  shares.painted = await share();
  await page.getByRole("button", { name: "Eraser" }).click();
  const eraserPressed = await page.getByRole("button", { name: "Eraser" }).getAttribute("aria-pressed");
  await paint(page, [0.5, 0.2], [0.5, 0.8], 16);
  shares.erased = await share();
  await page.getByRole("button", { name: "Undo" }).click();
  shares.undone = await share();
  await page.getByRole("button", { name: "Invert" }).click();
  shares.inverted = await share();
  await page.getByRole("button", { name: "Clear" }).click();
  shares.cleared = await share();
  await page.getByRole("button", { name: "Undo" }).click();
  shares.clearUndone = await share();
  // Another app: its own fields and step count default; what was set carries over.
  const app = page.getByLabel("App", { exact: true });
  const steps = page.getByLabel("Num inference steps", { exact: true });
  await page.getByLabel("Strength", { exact: true }).fill("0.5");
  await app.selectOption("fal-ai/hyper-sdxl/inpainting");
  const hyper = {
    steps: await steps.inputValue(),
    choices: await steps.locator("option").allTextContents(),
    strength: await page.getByLabel("Strength", { exact: true }).inputValue(),
    checkerVersion: await page.getByLabel("Safety checker version", { exact: true }).count(),
  };
  await app.selectOption(LIGHTNING);
  const lightning = { steps: await steps.inputValue(), choices: await steps.locator("option").allTextContents() };
  return { dropped, shares, eraserPressed, hyper, lightning };
}

/**
 * The side-by-side view: two variants, same inputs and seed, both shown with their latencies. The mask comes from
 * a mask file this time.
 */
export async function side_by_side(env, { key, image, mask, variants }) {
  const page = await openPlayground(env, { key, image });
  await smallInputs(page, { seed: null });
  await page.getByLabel("Lock seed", { exact: true }).uncheck();
  await page.getByLabel("Mask file", { exact: true }).setInputFiles(mask);
  await page.locator("#image-info", { hasText: "% to repaint" }).waitFor();
  const submits = recordSubmits(page);
  for (const label of variants) await page.getByLabel(label, { exact: true }).check();
  await page.getByRole("button", { name: "Run side by side" }).click();
  const cards = [];
  for (const label of variants) {
    const card = page.getByRole("group", { name: label });
    const img = card.getByRole("img");
    await img.waitFor({ state: "visible" });
    await card.locator(".latency", { hasText: "end to end" }).waitFor();
    await page.waitForFunction((name) => {
      const node = document.querySelector(`[aria-label="${name}"] img`);
      return node && node.complete && node.naturalWidth > 0;
    }, label);
    cards.push({
      label,
      text: await card.locator(".latency").innerText(),
      size: await img.evaluate((node) => [node.naturalWidth, node.naturalHeight]),
      src: await img.getAttribute("src"),
    });
  }
  const seed = await page.getByLabel("Seed", { exact: true }).inputValue();
  const screenshots = [await shot(env, page, "9-side-by-side")];
  return { cards, seed, submits, screenshots };
}

/** Both pages at a viewport: nothing wider than the window, and the main controls visible on screen. */
export async function layout(env, { key, image, width, height }) {
  const page = await openPlayground(env, { key, image, viewport: { width, height } });
  const controls = ["API key", "Image", "Mask file", "Brush size", "App", "Prompt", "Num inference steps", "Seed"];
  const buttons = ["Eraser", "Undo", "Invert", "Clear", "Generate", "Run side by side"];
  const report = { width, pages: {} };
  const check = async (name, locators) => {
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    const hidden = [];
    for (const [label, locator] of locators) {
      await locator.scrollIntoViewIfNeeded();
      const box = await locator.boundingBox();
      const visible = await locator.isVisible();
      if (!visible || !box || box.x < 0 || box.x + box.width > width + 1 || box.width < 8) hidden.push(label);
    }
    report.pages[name] = { overflow, hidden, screenshot: await shot(env, page, `layout-${name}-${width}x${height}`) };
  };
  await check("playground", [
    ...controls.map((label) => [label, page.getByLabel(label, { exact: true })]),
    ...buttons.map((name) => [name, page.getByRole("button", { name, exact: true })]),
    ["Mask canvas", page.getByRole("img", { name: /^Mask/ })],
  ]);
  await page.goto(`${env.base}/ui/status?refresh=1`);
  await page.waitForSelector("body[data-refreshed]");
  await check("status", [
    ["API key", page.getByLabel("API key", { exact: true })],
    ["Readiness", page.getByRole("group", { name: "Readiness" })],
    ["Queue depth", page.getByRole("group", { name: "Queue depth" })],
    ["Recent requests", page.getByRole("table", { name: "Your recent requests" })],
  ]);
  return report;
}

/** The operations page: readiness, variants, queue depth and this key's recent requests. */
export async function status_page(env, { key, expect }) {
  const { page } = await env.newPage();
  await page.goto(`${env.base}/ui/status?refresh=0.3`);
  await page.getByLabel("API key", { exact: true }).fill(key);
  await page.getByLabel("API key", { exact: true }).dispatchEvent("change");
  const table = page.getByRole("table", { name: "Your recent requests" });
  await table.locator(`tr[data-request-id="${expect}"]`).waitFor();
  const rows = await table.locator("tbody tr").evaluateAll((trs) =>
    trs.map((tr) => [...tr.querySelectorAll("td")].map((td) => td.textContent)),
  );
  const result = {
    readiness: await page.locator("#readiness").innerText(),
    queueDepth: await page.locator("#queue-depth").innerText(),
    workers: await page.locator("#worker-count").innerText(),
    variants: await page.locator("#variants li").allTextContents(),
    rows,
    screenshots: [await shot(env, page, "10-status")],
  };
  // Without a key the page says what the server says (401), instead of an empty table.
  await page.getByLabel("API key", { exact: true }).fill("");
  await page.getByLabel("API key", { exact: true }).dispatchEvent("change");
  await page.getByRole("alert").waitFor({ state: "visible" });
  result.withoutKey = await page.getByRole("alert").innerText();
  return result;
}
