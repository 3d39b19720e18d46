// The image and the mask painted over it. The mask canvas has the image's own size: painted pixels are opaque
// (shown in a colour over the image), the rest transparent. What is sent is fal's mask: white = repaint,
// black = keep, the image's size, a PNG (the server binarises at 128, as this export does).

const PAINT = "rgb(255, 40, 110)";
const UNDO_DEPTH = 30;

export class MaskEditor {
  constructor(imageCanvas, maskCanvas, onChange = () => {}) {
    this.image = imageCanvas;
    this.mask = maskCanvas;
    this.onChange = onChange;
    this.brush = 24;
    this.eraser = false;
    this.undoStack = [];
    this.last = null;
    this.ready = false;
    this.mask.addEventListener("pointerdown", (e) => this.down(e));
    this.mask.addEventListener("pointermove", (e) => this.move(e));
    this.mask.addEventListener("pointerup", (e) => this.up(e));
    this.mask.addEventListener("pointercancel", (e) => this.up(e));
  }

  get width() {
    return this.mask.width;
  }

  get height() {
    return this.mask.height;
  }

  /** Show `source` (an ImageBitmap or image) and start an empty mask of its size. */
  setImage(source, width, height) {
    for (const canvas of [this.image, this.mask]) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = this.image.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    if (source) ctx.drawImage(source, 0, 0, width, height);
    this.undoStack = [];
    this.ready = true;
    this.changed();
  }

  /** A mask file: white (>= 128 in luminance) = repaint, stretched to the image's size. */
  loadMask(source) {
    this.snapshot();
    const scratch = document.createElement("canvas");
    scratch.width = this.width;
    scratch.height = this.height;
    const sctx = scratch.getContext("2d");
    sctx.drawImage(source, 0, 0, this.width, this.height);
    const pixels = sctx.getImageData(0, 0, this.width, this.height);
    const out = this.ctx().createImageData(this.width, this.height);
    const [r, g, b] = [255, 40, 110];
    for (let i = 0; i < pixels.data.length; i += 4) {
      const d = pixels.data;
      const white = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2] >= 128 && d[i + 3] >= 128;
      out.data.set(white ? [r, g, b, 255] : [0, 0, 0, 0], i);
    }
    this.ctx().putImageData(out, 0, 0);
    this.changed();
  }

  ctx() {
    return this.mask.getContext("2d", { willReadFrequently: true });
  }

  point(event) {
    const rect = this.mask.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * this.width) / rect.width,
      y: ((event.clientY - rect.top) * this.height) / rect.height,
    };
  }

  down(event) {
    if (!this.ready || event.button > 0) return;
    event.preventDefault();
    this.mask.setPointerCapture(event.pointerId);
    this.snapshot();
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const next = this.point(event);
    this.stroke(this.last, next);
    this.last = next;
  }

  up(event) {
    if (!this.last) return;
    this.last = null;
    if (this.mask.hasPointerCapture(event.pointerId)) this.mask.releasePointerCapture(event.pointerId);
    this.changed();
  }

  stroke(from, to) {
    const ctx = this.ctx();
    ctx.save();
    ctx.globalCompositeOperation = this.eraser ? "destination-out" : "source-over";
    ctx.strokeStyle = PAINT;
    ctx.fillStyle = PAINT;
    ctx.lineWidth = this.brush;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    ctx.restore();
  }

  snapshot() {
    if (!this.ready) return;
    this.undoStack.push(this.ctx().getImageData(0, 0, this.width, this.height));
    if (this.undoStack.length > UNDO_DEPTH) this.undoStack.shift();
  }

  undo() {
    const previous = this.undoStack.pop();
    if (previous) {
      this.ctx().putImageData(previous, 0, 0);
      this.changed();
    }
  }

  clear() {
    this.snapshot();
    this.ctx().clearRect(0, 0, this.width, this.height);
    this.changed();
  }

  invert() {
    this.snapshot();
    const ctx = this.ctx();
    const pixels = ctx.getImageData(0, 0, this.width, this.height);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      const painted = d[i + 3] >= 128;
      d.set(painted ? [0, 0, 0, 0] : [255, 40, 110, 255], i);
    }
    ctx.putImageData(pixels, 0, 0);
    this.changed();
  }

  /** The share of the image marked for repainting (0..1). */
  coverage() {
    if (!this.ready) return 0;
    const d = this.ctx().getImageData(0, 0, this.width, this.height).data;
    let painted = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] >= 128) painted += 1;
    return painted / (this.width * this.height);
  }

  /** fal's mask as a PNG data URI: white where painted, black elsewhere, the image's size. */
  toDataURL() {
    const out = document.createElement("canvas");
    out.width = this.width;
    out.height = this.height;
    const octx = out.getContext("2d");
    const source = this.ctx().getImageData(0, 0, this.width, this.height).data;
    const pixels = octx.createImageData(this.width, this.height);
    for (let i = 0; i < source.length; i += 4) {
      const v = source[i + 3] >= 128 ? 255 : 0;
      pixels.data.set([v, v, v, 255], i);
    }
    octx.putImageData(pixels, 0, 0);
    return out.toDataURL("image/png");
  }

  changed() {
    this.onChange(this);
  }
}

/** Decode a file the browser can show; null (and the reason) when it cannot. */
export async function decodeImage(file) {
  try {
    const bitmap = await createImageBitmap(file);
    return { bitmap, width: bitmap.width, height: bitmap.height, error: null };
  } catch (error) {
    return { bitmap: null, width: 0, height: 0, error: String(error && error.message ? error.message : error) };
  }
}

/** A file's bytes as a data URI (sent as they are: no re-encoding, the server decodes them). */
export function fileToDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
