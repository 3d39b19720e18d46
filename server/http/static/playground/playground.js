// The playground page: pick an image, paint the mask, set the inputs, run, watch, compare, look back.

import { Api, appsOf, saveKey, savedKey, variantsOf } from "./api.js";
import { AppForm, bodyFor } from "./fields.js";
import { blobOf, clearResults, listResults, saveResult } from "./history.js";
import { decodeImage, fileToDataURL, MaskEditor } from "./mask.js";
import { Run } from "./run.js";

const $ = (id) => document.getElementById(id);
const APP_STORAGE = "inpaint-server.app";

const state = {
  api: new Api(() => $("api-key").value),
  apps: [],
  limits: {},
  form: null,
  imageFile: null,
  imageNote: "", // why the browser cannot show the picked file, if it cannot
  imageURL: null, // an object URL of the picked file, for the before/after view
  run: null,
};

const editor = new MaskEditor($("image-canvas"), $("mask-canvas"), describeMask);

// ------------------------------------------------------------------ start

async function start() {
  $("api-key").value = savedKey();
  $("api-key").addEventListener("input", () => saveKey($("api-key").value.trim()));
  wireImage();
  wireTools();
  $("inputs").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  $("cancel").addEventListener("click", cancel);
  $("compare").addEventListener("click", compare);
  $("history-select").addEventListener("change", showHistory);
  $("history-clear").addEventListener("click", async () => {
    await clearResults();
    await refreshHistory();
  });
  $("ba-slider").addEventListener("input", slide);
  window.addEventListener("resize", fitCanvas);
  try {
    const [config, openapi] = await Promise.all([state.api.config(), state.api.openapi()]);
    state.limits = config.limits || {};
    if (config.auth_required) $("api-key").required = true;
    state.apps = appsOf(openapi);
  } catch (error) {
    showError(`Could not read this server's API description: ${error.message}`);
    return;
  }
  const select = $("app");
  for (const app of state.apps) select.append(new Option(app.id, app.id));
  const remembered = localStorage.getItem(APP_STORAGE);
  if (state.apps.some((app) => app.id === remembered)) select.value = remembered;
  select.addEventListener("change", () => {
    localStorage.setItem(APP_STORAGE, select.value);
    renderForm();
  });
  renderForm();
  renderVariants();
  await refreshHistory();
  document.body.dataset.ready = "true";
}

function currentApp() {
  return state.apps.find((app) => app.id === $("app").value) || state.apps[0];
}

function renderForm() {
  const previous = state.form ? state.form.values() : {};
  state.form = new AppForm(currentApp(), state.limits, previous);
  state.form.render($("fields"));
  $("previews-option").hidden = !currentApp().streams;
}

// ------------------------------------------------------------------ image and mask

function wireImage() {
  $("image-file").addEventListener("change", () => {
    const file = $("image-file").files[0];
    if (file) loadImage(file);
  });
  $("mask-file").addEventListener("change", async () => {
    const file = $("mask-file").files[0];
    if (!file) return;
    if (!editor.ready) editor.setImage(null, 512, 512);
    const decoded = await decodeImage(file);
    if (decoded.bitmap) {
      editor.loadMask(decoded.bitmap);
      showStage();
    } else {
      showError(`This browser cannot read ${file.name} as a mask image (${decoded.error}).`);
    }
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) loadImage(file);
  });
}

async function loadImage(file) {
  hideError();
  state.imageFile = file;
  if (state.imageURL) URL.revokeObjectURL(state.imageURL);
  state.imageURL = URL.createObjectURL(file);
  const decoded = await decodeImage(file);
  state.imageNote = "";
  if (decoded.bitmap) {
    editor.setImage(decoded.bitmap, decoded.width, decoded.height);
    const side = Math.max(decoded.width, decoded.height);
    const brush = $("brush-size");
    brush.max = Math.max(8, Math.round(side / 3));
    brush.value = Math.max(2, Math.round(side / 16));
    brush.dispatchEvent(new Event("input"));
  } else {
    // Sent as it is all the same: the server says what it makes of it.
    state.imageNote =
      `This browser cannot show ${file.name} (${decoded.error}); it will be sent as it is and the server will say whether it can read it.`;
    editor.setImage(null, editor.ready ? editor.width : 512, editor.ready ? editor.height : 512);
  }
  showStage();
}

function showStage() {
  $("canvas-box").hidden = false;
  $("stage-hint").hidden = true;
  fitCanvas();
}

/** Show the canvases as large as the panel allows (small images scaled up, so that they can be painted). */
function fitCanvas() {
  if (!editor.ready) return;
  const box = $("canvas-box");
  const room = $("drop-zone").clientWidth;
  const maxHeight = Math.max(240, window.innerHeight * 0.6);
  const scale = Math.min(room / editor.width, maxHeight / editor.height, 8);
  box.style.width = `${Math.floor(editor.width * scale)}px`;
  box.style.height = `${Math.floor(editor.height * scale)}px`;
}

function describeMask() {
  if (!editor.ready) return;
  const share = editor.coverage();
  const name = state.imageFile ? state.imageFile.name : "no image";
  const mask = share === 0 ? "nothing painted yet" : `${(share * 100).toFixed(1)} % to repaint`;
  const note = state.imageNote ? ` ${state.imageNote}` : "";
  $("image-info").textContent = `${name}, ${editor.width} × ${editor.height}: ${mask}.${note}`;
}

function wireTools() {
  const brush = $("brush-size");
  brush.addEventListener("input", () => {
    editor.brush = Number(brush.value);
    $("brush-size-value").value = brush.value;
  });
  $("eraser").addEventListener("click", () => {
    editor.eraser = !editor.eraser;
    $("eraser").setAttribute("aria-pressed", String(editor.eraser));
  });
  $("undo").addEventListener("click", () => editor.undo());
  $("invert").addEventListener("click", () => editor.ready && editor.invert());
  $("clear").addEventListener("click", () => editor.ready && editor.clear());
}

// ------------------------------------------------------------------ one run

async function inputFor(app, overrides = {}) {
  const values = state.form.values();
  const body = bodyFor(app, { ...values, ...overrides });
  body.prompt = $("prompt").value;
  body.image_url = await fileToDataURL(state.imageFile);
  body.mask_url = editor.toDataURL();
  return body;
}

function runUI() {
  return {
    requestId: (id) => setStatus(`Request ${id} submitted`),
    queued: (position) => setStatus(`In the queue: ${position} ahead`),
    started: () => setStatus("Running"),
    progress: (step, total) => {
      $("progress").max = total;
      $("progress").value = step;
      $("progress-text").textContent = `Step ${step} of ${total}`;
    },
    log: (entry) => {
      const item = document.createElement("li");
      item.textContent = `${entry.level} ${entry.message}`;
      item.className = `log-${String(entry.level).toLowerCase()}`;
      $("logs").append(item);
    },
    preview: (preview, step, total) => {
      $("preview").src = preview.url;
      $("preview-figure").hidden = false;
      $("preview-caption").textContent = `Preview of step ${step} of ${total}`;
    },
  };
}

async function generate() {
  hideError();
  if (!state.imageFile) {
    showError("Pick an image first.");
    return;
  }
  const app = currentApp();
  resetRun();
  $("generate").disabled = true;
  $("cancel").disabled = false;
  setStatus("Submitting");
  const previews = app.streams && $("previews-on").checked;
  try {
    const input = await inputFor(app);
    state.run = new Run(state.api, app.id, input, runUI(), { previews });
    const { output, requestId, latencyMs } = await state.run.start();
    setStatus(`Done in ${(latencyMs / 1000).toFixed(2)} s`);
    showOutput(output, requestId, latencyMs);
    state.form.showSeed(output.seed);
    await remember(app, input, output, requestId);
  } catch (error) {
    setStatus("Failed");
    showError(error.message);
  } finally {
    state.run = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function cancel() {
  if (!state.run) return;
  $("cancel").disabled = true;
  setStatus("Cancelling");
  try {
    await state.run.cancel();
  } catch (error) {
    showError(error.message);
  }
}

function resetRun() {
  $("logs").replaceChildren();
  $("results").replaceChildren();
  $("progress").value = 0;
  $("progress").max = 1;
  $("progress-text").textContent = "";
  $("preview-figure").hidden = true;
}

function showOutput(output, requestId, latencyMs) {
  const results = $("results");
  results.replaceChildren();
  output.images.forEach((image, index) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = `Result ${index + 1}`;
    const caption = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = image.url;
    link.download = image.file_name || `result-${index + 1}.${(image.content_type || "image/jpeg").split("/")[1]}`;
    link.textContent = "Download";
    const flagged = output.has_nsfw_concepts && output.has_nsfw_concepts[index] ? " · flagged by the safety checker" : "";
    caption.append(`${image.width} × ${image.height} ${image.content_type || ""}${flagged} · `, link);
    figure.append(img, caption);
    results.append(figure);
  });
  const facts = document.createElement("dl");
  facts.className = "facts";
  const add = (term, value) => facts.append(Object.assign(document.createElement("dt"), { textContent: term }),
    Object.assign(document.createElement("dd"), { textContent: value }));
  add("Seed", String(output.seed));
  add("Latency", `${(latencyMs / 1000).toFixed(2)} s (in this browser)`);
  for (const [name, seconds] of Object.entries(output.timings || {})) add(`Timing: ${name}`, `${seconds.toFixed(3)} s`);
  add("Prompt", output.prompt);
  add("Request", requestId || "");
  results.append(facts);
}

// ------------------------------------------------------------------ side by side

function renderVariants() {
  const box = $("variants");
  for (const variant of variantsOf(state.apps)) {
    const id = `variant-${variant.appId.replaceAll("/", "-")}-${variant.steps}`;
    const input = Object.assign(document.createElement("input"), { type: "checkbox", id });
    input.dataset.appId = variant.appId;
    input.dataset.steps = variant.steps;
    input.dataset.label = variant.label;
    const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: variant.label });
    const span = document.createElement("span");
    span.className = "inline-check";
    span.append(input, label);
    box.append(span);
  }
}

async function compare() {
  hideError();
  const chosen = [...$("variants").querySelectorAll("input:checked")];
  if (!state.imageFile) return showError("Pick an image first.");
  if (chosen.length === 0) return showError("Choose at least one variant to compare.");
  const grid = $("compare-results");
  grid.replaceChildren();
  $("compare").disabled = true;
  const seed = state.form.sharedSeed();
  const cards = chosen.map((input) => compareCard(input.dataset.label));
  grid.append(...cards.map((card) => card.root));
  try {
    for (const [index, input] of chosen.entries()) {
      const card = cards[index];
      const app = state.apps.find((candidate) => candidate.id === input.dataset.appId);
      card.status.textContent = "Running";
      try {
        const body = await inputFor(app, { num_inference_steps: input.dataset.steps, seed });
        const quiet = { requestId() {}, queued() {}, started() {}, progress() {}, log() {}, preview() {} };
        const { output, latencyMs } = await new Run(state.api, app.id, body, quiet).start();
        card.image.src = output.images[0].url;
        card.image.hidden = false;
        const inference = output.timings && output.timings.inference;
        card.status.textContent = `${(latencyMs / 1000).toFixed(2)} s end to end` +
          (inference !== undefined ? ` · inference ${inference.toFixed(3)} s` : "") + ` · seed ${output.seed}`;
      } catch (error) {
        card.status.textContent = error.message;
        card.root.classList.add("failed");
      }
    }
  } finally {
    $("compare").disabled = false;
  }
}

function compareCard(label) {
  const root = document.createElement("figure");
  root.className = "compare-card";
  root.setAttribute("role", "group");
  root.setAttribute("aria-label", label);
  const title = Object.assign(document.createElement("figcaption"), { textContent: label });
  const image = Object.assign(document.createElement("img"), { alt: `${label} result`, hidden: true });
  const status = Object.assign(document.createElement("p"), { textContent: "Waiting", className: "latency" });
  root.append(title, image, status);
  return { root, image, status };
}

// ------------------------------------------------------------------ before and after (kept in this browser)

async function remember(app, input, output, requestId) {
  try {
    const outputs = await Promise.all(output.images.map((image) => blobOf(image.url)));
    await saveResult({
      id: requestId || `local-${Date.now()}`,
      at: Date.now(),
      appId: app.id,
      steps: input.num_inference_steps,
      seed: output.seed,
      prompt: output.prompt,
      input: state.imageFile,
      outputs: outputs.filter(Boolean),
    });
    await refreshHistory();
  } catch (error) {
    console.warn("could not keep this result in the browser", error);
  }
}

let historyEntries = [];
let historyURLs = [];

async function refreshHistory() {
  try {
    historyEntries = await listResults();
  } catch {
    historyEntries = [];
  }
  const select = $("history-select");
  select.replaceChildren(
    ...historyEntries.map((entry, index) => {
      const when = new Date(entry.at).toLocaleTimeString();
      return new Option(`${when} · ${entry.appId.split("/")[1]} ${entry.steps || ""} · ${entry.prompt}`, String(index));
    }),
  );
  showHistory();
}

function showHistory() {
  for (const url of historyURLs) URL.revokeObjectURL(url);
  historyURLs = [];
  const entry = historyEntries[Number($("history-select").value)];
  $("before-after").hidden = !entry || entry.outputs.length === 0;
  if (!entry || entry.outputs.length === 0) return;
  const before = URL.createObjectURL(entry.input);
  const after = URL.createObjectURL(entry.outputs[0]);
  historyURLs.push(before, after);
  $("ba-before").src = before;
  $("ba-after").src = after;
  slide();
}

function slide() {
  const shown = Number($("ba-slider").value);
  $("ba-after").style.clipPath = `inset(0 0 0 ${shown}%)`;
}

// ------------------------------------------------------------------ messages

function setStatus(text) {
  $("run-status").textContent = text;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

start();
