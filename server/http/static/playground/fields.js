// The input form of one app, built from its OpenAPI schema: fal's defaults, enums and limits as the server
// states them, and this server's own limits (/ui/config.json). image_url, mask_url and prompt have their own
// controls; every other field of the schema gets one here, so a field the server adds shows up by itself.

const OWN_CONTROLS = new Set(["image_url", "mask_url", "prompt"]);
const CUSTOM_SIZE = "custom";

function el(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) node.append(child);
  return node;
}

// Shown first, in this order; the schema's other fields follow in its own order.
const ORDER = ["num_inference_steps", "image_size", "strength", "seed", "num_images", "format"];

/** "Num inference steps" from the schema's "Num Inference Steps" (or the control's own label). */
function labelOf(name, property) {
  if (property.label) return property.label;
  const title = property.title || name;
  return title.charAt(0) + title.slice(1).toLowerCase();
}

/** A field wrapper: label, control, and the schema's description as its hint. */
function row(name, property, control, extra = []) {
  const id = control.id;
  const hint = property.description ? el("small", { id: `${id}-hint`, class: "hint", text: property.description }) : null;
  if (hint) control.setAttribute("aria-describedby", hint.id);
  const label = el("label", { for: id, text: labelOf(name, property) });
  return el("div", { class: `field field-${name}` }, [label, control, ...extra, ...(hint ? [hint] : [])]);
}

function numberLimits(property) {
  const limits = {};
  if (property.minimum !== undefined) limits.min = property.minimum;
  if (property.exclusiveMinimum !== undefined) limits.min = property.type === "integer" ? property.exclusiveMinimum + 1 : 0.01;
  if (property.maximum !== undefined) limits.max = property.maximum;
  return limits;
}

/** One app's form: `render(container)` builds it, `values()` reads the input body's fields back. */
export class AppForm {
  constructor(app, limits = {}, previous = {}) {
    this.app = app;
    this.limits = limits;
    this.previous = previous;
    this.readers = {};
  }

  render(container) {
    container.replaceChildren();
    const names = Object.keys(this.app.properties).filter((name) => !OWN_CONTROLS.has(name));
    const rank = (name) => (ORDER.includes(name) ? ORDER.indexOf(name) : ORDER.length);
    names.sort((a, b) => rank(a) - rank(b));
    for (const name of names) {
      const raw = this.app.properties[name];
      const property = this.app.resolve(raw) || raw;
      container.append(this.control(name, property));
    }
  }

  control(name, property) {
    if (name === "image_size") return this.imageSize(name, property);
    if (name === "seed") return this.seed(name, property);
    if (name === "embeddings") return this.embeddings(name, property);
    const id = `field-${name}`;
    // What was set on the previous app's form carries over, but for the step count: each app has its own default.
    const carried = name in this.previous && name !== "num_inference_steps";
    const initial = carried ? this.previous[name] : property.default;
    if (property.enum) {
      const select = el("select", { id, name });
      for (const option of property.enum) select.append(el("option", { value: option, text: option }));
      const value = property.enum.includes(initial) ? initial : property.default;
      if (value !== undefined) select.value = value;
      this.readers[name] = () => select.value;
      return row(name, property, select);
    }
    if (property.type === "boolean") {
      const box = el("input", { id, name, type: "checkbox" });
      box.checked = Boolean(initial);
      this.readers[name] = () => box.checked;
      const wrapper = el("div", { class: "field field-check" }, [box, el("label", { for: id, text: labelOf(name, property) })]);
      if (property.description) {
        const hint = el("small", { id: `${id}-hint`, class: "hint", text: property.description });
        box.setAttribute("aria-describedby", hint.id);
        wrapper.append(hint);
      }
      return wrapper;
    }
    if (property.type === "integer" || property.type === "number") {
      const limits = numberLimits(property);
      if (name === "num_images" && this.limits.max_num_images) limits.max = Math.min(limits.max ?? Infinity, this.limits.max_num_images);
      const input = el("input", { id, name, type: "number", inputmode: "decimal", ...limits, step: property.type === "integer" ? 1 : 0.01 });
      if (initial !== undefined) input.value = initial;
      this.readers[name] = () => (input.value === "" ? undefined : Number(input.value));
      return row(name, property, input);
    }
    const input = el("input", { id, name, type: "text" });
    if (initial !== undefined) input.value = initial;
    this.readers[name] = () => (input.value === "" ? undefined : input.value);
    return row(name, property, input);
  }

  imageSize(name, property) {
    const variants = property.anyOf || [property];
    const presets = (variants.find((v) => v.enum) || {}).enum || [];
    const custom = this.app.resolve(variants.find((v) => v.$ref)) || { properties: {} };
    const select = el("select", { id: "field-image_size", name });
    for (const preset of presets) select.append(el("option", { value: preset, text: preset }));
    select.append(el("option", { value: CUSTOM_SIZE, text: "custom (width × height)" }));
    const side = (key) => {
      const p = custom.properties[key] || {};
      const input = el("input", { id: `field-image_size-${key}`, type: "number", step: 1, ...numberLimits(p) });
      input.value = p.default ?? 512;
      return input;
    };
    const width = side("width");
    const height = side("height");
    const box = el("div", { class: "size-box" }, [
      el("label", { for: width.id, text: "Width" }),
      width,
      el("label", { for: height.id, text: "Height" }),
      height,
    ]);
    const initial = this.previous.image_size ?? property.default;
    if (initial && typeof initial === "object") {
      select.value = CUSTOM_SIZE;
      width.value = initial.width;
      height.value = initial.height;
    } else if (initial) {
      select.value = initial;
    }
    const sync = () => {
      box.hidden = select.value !== CUSTOM_SIZE;
    };
    select.addEventListener("change", sync);
    sync();
    this.readers[name] = () =>
      select.value === CUSTOM_SIZE ? { width: Number(width.value), height: Number(height.value) } : select.value;
    this.setImageSize = (w, h) => {
      select.value = CUSTOM_SIZE;
      width.value = w;
      height.value = h;
      sync();
    };
    const pixels = this.limits.max_output_pixels;
    const extra = [box];
    if (pixels) extra.push(el("small", { class: "hint", text: `At most ${pixels.toLocaleString("en")} pixels on this server.` }));
    return row(name, property, select, extra);
  }

  seed(name, property) {
    const input = el("input", { id: "field-seed", name, type: "number", step: 1, placeholder: "random" });
    const lock = el("input", { id: "seed-lock", type: "checkbox" });
    const initial = this.previous.seed;
    if (initial !== undefined && initial !== null) {
      input.value = initial;
      lock.checked = Boolean(this.previous.seed_locked);
    }
    input.addEventListener("input", () => {
      lock.checked = input.value !== "";
    });
    const lockLabel = el("label", { for: "seed-lock", text: "Lock seed" });
    this.readers[name] = () => (lock.checked && input.value !== "" ? Number(input.value) : undefined);
    this.seedControls = { input, lock };
    return row(name, property, input, [el("span", { class: "inline-check" }, [lock, lockLabel])]);
  }

  /** After a run: show the seed it used, so that locking it reproduces the image. */
  showSeed(seed) {
    if (this.seedControls && !this.seedControls.lock.checked) this.seedControls.input.value = seed;
  }

  /** A seed shared by several runs (the side-by-side view): the locked one, or a new one shown in the field. */
  sharedSeed() {
    const locked = this.readers.seed ? this.readers.seed() : undefined;
    if (locked !== undefined) return locked;
    const seed = crypto.getRandomValues(new Uint32Array(1))[0];
    if (this.seedControls) this.seedControls.input.value = seed;
    return seed;
  }

  embeddings(name, property) {
    const url = el("input", { id: "field-embedding-url", type: "url", placeholder: "https://.../embedding.safetensors" });
    const tokens = el("input", { id: "field-embedding-tokens", type: "text", value: "<s0>, <s1>" });
    const previous = (this.previous.embeddings || [])[0];
    if (previous) {
      url.value = previous.path;
      tokens.value = (previous.tokens || []).join(", ");
    }
    this.readers[name] = () =>
      url.value.trim()
        ? [{ path: url.value.trim(), tokens: tokens.value.split(",").map((t) => t.trim()).filter(Boolean) }]
        : undefined;
    const tokenLabel = el("label", { for: tokens.id, text: "Embedding tokens" });
    const wrapper = row(name, { ...property, label: "Embedding URL" }, url, [tokenLabel, tokens]);
    return wrapper;
  }

  /** The body's fields (those left empty are not sent: the server's defaults apply). */
  values() {
    const out = {};
    for (const [name, read] of Object.entries(this.readers)) {
      const value = read();
      if (value !== undefined) out[name] = value;
    }
    if (this.seedControls) out.seed_locked = this.seedControls.lock.checked;
    return out;
  }
}

/** A body for `app` from values read off another app's form: only the fields `app` has. */
export function bodyFor(app, values) {
  const body = {};
  for (const [name, value] of Object.entries(values)) if (name in app.properties) body[name] = value;
  return body;
}
