// Zoom, pan and the overlays of the viewer's canvases: the part of a slice on screen, the
// mapping between slice pixels and canvas pixels, the scale bar and the crosshair.
//
// Slice pixels have their centres at integers: a slice of width W spans -0.5..W-0.5.
// A view shows W / zoom x H / zoom pixels around its centre (cx, cy).

import { drawScaled } from "./render.js";

export const MIN_ZOOM = 1;
export const MAX_ZOOM = 8;
const NICE_MM = [1, 2, 5, 10, 20, 50, 100, 200, 500];

// Canvas size (px) fitting a plane of width x height pixels of the given spacing into a
// box of `box` px, keeping its shape in millimetres.
export function fitSize(plane, box) {
  const wmm = plane.width * plane.pixel_spacing_mm[0];
  const hmm = plane.height * plane.pixel_spacing_mm[1];
  const scale = box / Math.max(wmm, hmm);
  return [Math.max(1, Math.round(wmm * scale)), Math.max(1, Math.round(hmm * scale))];
}

export class View {
  constructor(width, height) {
    this.width = width;
    this.height = height;
    this.zoom = 1;
    this.cx = (width - 1) / 2;
    this.cy = (height - 1) / 2;
  }

  // The visible source rectangle (x, y, w, h) in image units (0..width).
  source() {
    const w = this.width / this.zoom;
    const h = this.height / this.zoom;
    return [this.cx + 0.5 - w / 2, this.cy + 0.5 - h / 2, w, h];
  }

  // Keep the view over the image.
  clamp() {
    const [, , w, h] = this.source();
    const clampAxis = (c, size, visible) => Math.min(size - visible / 2 - 0.5,
      Math.max(visible / 2 - 0.5, c));
    this.cx = clampAxis(this.cx, this.width, w);
    this.cy = clampAxis(this.cy, this.height, h);
  }

  setZoom(zoom, around = null) {
    this.zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, zoom));
    if (around) [this.cx, this.cy] = around;
    this.clamp();
  }

  // Move the view by (dx, dy) canvas pixels of a canvas of the given size.
  pan(canvas, dx, dy) {
    const [, , w, h] = this.source();
    this.cx -= (dx * w) / canvas.width;
    this.cy -= (dy * h) / canvas.height;
    this.clamp();
  }

  // Canvas position of slice pixel (column, row).
  toCanvas(canvas, column, row) {
    const [x, y, w, h] = this.source();
    return [((column + 0.5 - x) * canvas.width) / w, ((row + 0.5 - y) * canvas.height) / h];
  }

  // Slice pixel (continuous column, row) under canvas position (x, y).
  toPixel(canvas, x, y) {
    const [sx, sy, w, h] = this.source();
    return [(x * w) / canvas.width + sx - 0.5, (y * h) / canvas.height + sy - 0.5];
  }

  // Paint an ImageData of the whole slice: the visible part, scaled, without smoothing.
  draw(canvas, image, background = "#101018") {
    drawScaled(canvas, image, background, this.source());
  }
}

// A scale bar at the bottom left: the longest "nice" length up to 30 % of the width.
// Returns its length in mm (and records it on the canvas for tests and tools).
export function drawScaleBar(canvas, view, spacingMm) {
  const [, , w] = view.source();
  const mmPerPx = (w * spacingMm) / canvas.width;
  let length = NICE_MM[0];
  for (const mm of NICE_MM) if (mm / mmPerPx <= 0.3 * canvas.width) length = mm;
  const px = length / mmPerPx;
  const ctx = canvas.getContext("2d");
  const y = canvas.height - 10;
  ctx.save();
  ctx.strokeStyle = "#ffffff";
  ctx.fillStyle = "#ffffff";
  ctx.shadowColor = "#000000"; // readable on bright images too
  ctx.shadowBlur = 3;
  ctx.lineWidth = 3;
  ctx.beginPath();
  ctx.moveTo(8, y);
  ctx.lineTo(8 + px, y);
  ctx.moveTo(8, y - 4);
  ctx.lineTo(8, y + 3);
  ctx.moveTo(8 + px, y - 4);
  ctx.lineTo(8 + px, y + 3);
  ctx.stroke();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "bottom";
  ctx.fillText(`${length} mm`, 10, y - 5);
  ctx.restore();
  canvas.dataset.scaleMm = String(length);
  canvas.dataset.scalePx = px.toFixed(2);
  return length;
}

// The crosshair: a horizontal and a vertical line through (x, y), open at the centre.
export function drawCrosshair(canvas, x, y, colour, dashed) {
  const ctx = canvas.getContext("2d");
  ctx.save();
  ctx.strokeStyle = colour;
  ctx.globalAlpha = 0.7;
  ctx.lineWidth = 1;
  if (dashed) ctx.setLineDash([4, 4]);
  ctx.beginPath();
  ctx.moveTo(0, y);
  ctx.lineTo(x - 12, y);
  ctx.moveTo(x + 12, y);
  ctx.lineTo(canvas.width, y);
  ctx.moveTo(x, 0);
  ctx.lineTo(x, y - 12);
  ctx.moveTo(x, y + 12);
  ctx.lineTo(x, canvas.height);
  ctx.stroke();
  ctx.restore();
}
