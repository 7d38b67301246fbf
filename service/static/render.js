// Pixel work of the viewer: 8-bit slices (row-major, top left first) to RGBA images.
// Pure functions; no DOM except drawScaled and drawMarker, which paint on a canvas.

// Grey slice -> RGBA.
export function grey(values, width, height) {
  const out = new ImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    const v = values[i];
    out.data[4 * i] = v;
    out.data[4 * i + 1] = v;
    out.data[4 * i + 2] = v;
    out.data[4 * i + 3] = 255;
  }
  return out;
}

// Opacity blend: (1 - alpha) * fixed + alpha * moving, in grey.
export function blend(fixed, moving, width, height, alpha) {
  const out = new ImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    const v = Math.round((1 - alpha) * fixed[i] + alpha * moving[i]);
    out.data[4 * i] = v;
    out.data[4 * i + 1] = v;
    out.data[4 * i + 2] = v;
    out.data[4 * i + 3] = 255;
  }
  return out;
}

// Fusion as in qa.png: the fixed image in green, the moving image in magenta (red + blue);
// where they agree the result is grey. `alpha` (0..1) is the moving image's share: 0.5
// gives both full weight.
export function fusion(fixed, moving, width, height, alpha) {
  const out = new ImageData(width, height);
  const wf = Math.min(1, 2 * (1 - alpha));
  const wm = Math.min(1, 2 * alpha);
  for (let i = 0; i < width * height; i++) {
    const m = Math.round(wm * moving[i]);
    out.data[4 * i] = m;
    out.data[4 * i + 1] = Math.round(wf * fixed[i]);
    out.data[4 * i + 2] = m;
    out.data[4 * i + 3] = 255;
  }
  return out;
}

// Checkerboard: tiles of `tile` pixels alternate fixed and moving; edges that run on
// across tile borders mean alignment.
export function checkerboard(fixed, moving, width, height, tile) {
  const out = new ImageData(width, height);
  for (let r = 0; r < height; r++) {
    for (let c = 0; c < width; c++) {
      const i = r * width + c;
      const useFixed = (Math.floor(r / tile) + Math.floor(c / tile)) % 2 === 0;
      const v = useFixed ? fixed[i] : moving[i];
      out.data[4 * i] = v;
      out.data[4 * i + 1] = v;
      out.data[4 * i + 2] = v;
      out.data[4 * i + 3] = 255;
    }
  }
  return out;
}

// Sobel gradients (gx, gy) and magnitude (borders replicated).
export function sobel(values, width, height) {
  const gx = new Float32Array(width * height);
  const gy = new Float32Array(width * height);
  const magnitude = new Float32Array(width * height);
  const at = (r, c) => values[Math.min(height - 1, Math.max(0, r)) * width
    + Math.min(width - 1, Math.max(0, c))];
  for (let r = 0; r < height; r++) {
    for (let c = 0; c < width; c++) {
      const i = r * width + c;
      gx[i] = at(r - 1, c + 1) + 2 * at(r, c + 1) + at(r + 1, c + 1)
        - at(r - 1, c - 1) - 2 * at(r, c - 1) - at(r + 1, c - 1);
      gy[i] = at(r + 1, c - 1) + 2 * at(r + 1, c) + at(r + 1, c + 1)
        - at(r - 1, c - 1) - 2 * at(r - 1, c) - at(r - 1, c + 1);
      magnitude[i] = Math.hypot(gx[i], gy[i]);
    }
  }
  return { gx, gy, magnitude };
}

// Thin edges: pixels whose gradient magnitude passes the threshold and is a local
// maximum along the gradient direction (quantised to 0, 45, 90, 135 degrees).
export function edgeMask(values, width, height, relative = 0.07) {
  const { gx, gy, magnitude } = sobel(values, width, height);
  let max = 0;
  for (const m of magnitude) max = Math.max(max, m);
  const threshold = Math.max(8, relative * max);
  const mask = new Uint8Array(width * height);
  const mag = (r, c) => (r < 0 || c < 0 || r >= height || c >= width ? 0 : magnitude[r * width + c]);
  for (let r = 0; r < height; r++) {
    for (let c = 0; c < width; c++) {
      const i = r * width + c;
      const m = magnitude[i];
      if (m < threshold) continue;
      const angle = ((Math.atan2(gy[i], gx[i]) * 180) / Math.PI + 180) % 180;
      const [dr, dc] = angle < 22.5 || angle >= 157.5 ? [0, 1]
        : angle < 67.5 ? [1, 1] : angle < 112.5 ? [1, 0] : [1, -1];
      if (m >= mag(r + dr, c + dc) && m >= mag(r - dr, c - dc)) mask[i] = 1;
    }
  }
  return mask;
}

// Edge overlay: the fixed image in grey with the moving image's edges in magenta.
export function edges(fixed, moving, width, height) {
  const mask = edgeMask(moving, width, height);
  const out = grey(fixed, width, height);
  for (let i = 0; i < width * height; i++) {
    if (mask[i]) {
      out.data[4 * i] = 255;
      out.data[4 * i + 1] = 0;
      out.data[4 * i + 2] = 255;
    }
  }
  return out;
}

// Colour map (low: dark blue, high: yellow) of float values; null/NaN transparent.
const STOPS = [0.0, 0.3, 0.6, 0.85, 1.0];
const COLOURS = [[20, 12, 80], [60, 70, 200], [30, 170, 150], [180, 215, 60], [255, 240, 50]];

export function colourMap(values, width, height) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v !== null && Number.isFinite(v)) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
  }
  const out = new ImageData(width, height);
  const span = hi > lo ? hi - lo : 1;
  for (let i = 0; i < width * height; i++) {
    const v = values[i];
    if (v === null || !Number.isFinite(v)) continue;
    const t = (v - lo) / span;
    let k = 0;
    while (k < STOPS.length - 2 && t > STOPS[k + 1]) k++;
    const f = Math.min(1, Math.max(0, (t - STOPS[k]) / (STOPS[k + 1] - STOPS[k])));
    for (let ch = 0; ch < 3; ch++) {
      out.data[4 * i + ch] = Math.round(COLOURS[k][ch] + f * (COLOURS[k + 1][ch] - COLOURS[k][ch]));
    }
    out.data[4 * i + 3] = 255;
  }
  return { image: out, min: lo, max: hi };
}

// Paint an ImageData onto `canvas`, scaled to the canvas size without smoothing: the
// whole image, or the part `[x, y, w, h]` of it (in image pixels) when `rect` is given.
export function drawScaled(canvas, image, background = "#101018", rect = null) {
  const source = document.createElement("canvas");
  source.width = image.width;
  source.height = image.height;
  source.getContext("2d").putImageData(image, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.fillStyle = background;
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (rect) ctx.drawImage(source, ...rect, 0, 0, canvas.width, canvas.height);
  else ctx.drawImage(source, 0, 0, canvas.width, canvas.height);
}

// Canvas position (canvas pixels) of slice pixel (column, row): pixel centres at integers.
export function toCanvas(canvas, width, height, column, row) {
  return [(column + 0.5) * canvas.width / width, (row + 0.5) * canvas.height / height];
}

// A marker: a cross ("cross") or a ring ("ring"); dashed when the point is off the slice.
export function drawMarker(canvas, x, y, { shape = "cross", colour = "#ffd700", dashed = false } = {}) {
  const ctx = canvas.getContext("2d");
  ctx.save();
  ctx.lineWidth = 2;
  ctx.strokeStyle = colour;
  if (dashed) ctx.setLineDash([3, 3]);
  ctx.beginPath();
  if (shape === "ring") {
    ctx.arc(x, y, 7, 0, 2 * Math.PI);
  } else {
    ctx.moveTo(x - 9, y);
    ctx.lineTo(x - 3, y);
    ctx.moveTo(x + 3, y);
    ctx.lineTo(x + 9, y);
    ctx.moveTo(x, y - 9);
    ctx.lineTo(x, y - 3);
    ctx.moveTo(x, y + 3);
    ctx.lineTo(x, y + 9);
  }
  ctx.stroke();
  ctx.restore();
}

// Orientation letters at the middle of each edge.
export function drawLetters(canvas, letters) {
  const ctx = canvas.getContext("2d");
  ctx.save();
  ctx.font = "bold 12px sans-serif";
  ctx.fillStyle = "#ffd700";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.fillText(letters.left, 3, canvas.height / 2);
  ctx.textAlign = "right";
  ctx.fillText(letters.right, canvas.width - 3, canvas.height / 2);
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.fillText(letters.top, canvas.width / 2, 3);
  ctx.textBaseline = "bottom";
  ctx.fillText(letters.bottom, canvas.width / 2, canvas.height - 3);
  ctx.restore();
}

// 4x4 matrix (rows) times (x, y, z, 1): the first three components.
export function apply4(matrix, point) {
  const [x, y, z] = point;
  return [0, 1, 2].map((r) => matrix[r][0] * x + matrix[r][1] * y + matrix[r][2] * z + matrix[r][3]);
}

// A colour overlay of 8-bit values (0..255, e.g. a displacement magnitude through its
// window) on the grey fixed image: the colour map of colourMap, `alpha` opaque; zero left
// grey.
export function heatOverlay(fixed, values, width, height, alpha) {
  const out = grey(fixed, width, height);
  for (let i = 0; i < width * height; i++) {
    const t = values[i] / 255;
    if (t <= 0) continue;
    let k = 0;
    while (k < STOPS.length - 2 && t > STOPS[k + 1]) k++;
    const f = Math.min(1, Math.max(0, (t - STOPS[k]) / (STOPS[k + 1] - STOPS[k])));
    for (let ch = 0; ch < 3; ch++) {
      const colour = COLOURS[k][ch] + f * (COLOURS[k + 1][ch] - COLOURS[k][ch]);
      out.data[4 * i + ch] = Math.round((1 - alpha) * out.data[4 * i + ch] + alpha * colour);
    }
  }
  return out;
}
