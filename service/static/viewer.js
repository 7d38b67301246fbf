// The result viewer: three orthogonal planes of the fixed grid, each a pair of canvases
// (fixed | moving compared with fixed), a point picker and the similarity heatmaps.
//
// Geometry comes from GET /v1/jobs/{id}/viewer: per plane a 4x4 matrix from
// (column, row, slice, 1) to LPS mm and its inverse, and the job's 4x4 matrix T that
// maps a fixed point p to the corresponding moving point T p (LPS mm). Non-linear jobs
// (mapping "displacement") get T p from GET .../point instead.

import { describeError, getBytes, getJson, jobPath } from "./api.js";
import * as R from "./render.js";

const PLANES = ["axial", "coronal", "sagittal"];
const DISPLAY_PX = 240; // longest side of a canvas
const SLICE_CACHE = 240; // slices kept in memory
const FIXED_COLOUR = "#ffd700";
const MOVING_COLOUR = "#00e5ff";

const title = (s) => s.charAt(0).toUpperCase() + s.slice(1);
const fmt = (p) => `(${p.map((v) => v.toFixed(1)).join(", ")})`;

function canvasSize(plane) {
  const wmm = plane.width * plane.pixel_spacing_mm[0];
  const hmm = plane.height * plane.pixel_spacing_mm[1];
  const scale = DISPLAY_PX / Math.max(wmm, hmm);
  return [Math.max(1, Math.round(wmm * scale)), Math.max(1, Math.round(hmm * scale))];
}

export class Viewer {
  constructor(jobId, root) {
    this.jobId = jobId;
    this.root = root;
    this.el = (id) => root.querySelector(`#${id}`);
    this.slices = new Map();
    this.index = {};
    this.tokens = {};
    this.point = null;
    this.moved = null; // T(point), LPS mm
    this.heatmapToken = 0;
    this.abort = new AbortController();
  }

  get overlay() {
    return this.el("display-form").elements.overlay.value;
  }

  get stage() {
    return this.el("display-form").elements.stage.value;
  }

  get opacity() {
    return Number(this.el("opacity").value) / 100;
  }

  async open() {
    const status = this.el("viewer-status");
    status.textContent = "Loading the viewer…";
    const geometry = await getJson(jobPath(this.jobId, "/viewer"));
    // Closed (or replaced by another job's viewer) while loading: leave the page alone.
    if (this.abort.signal.aborted) return;
    this.geometry = geometry;
    this.buildPlanes();
    this.bindControls();
    this.resetHeatmaps();
    this.el("point-info").textContent = "No point marked yet.";
    delete this.el("point-info").dataset.fixed;
    delete this.el("point-info").dataset.moving;
    for (const k of ["x", "y", "z"]) this.el(`point-${k}`).value = "";
    await this.renderAll();
    if (this.abort.signal.aborted) return;
    status.textContent = "Viewer ready.";
    this.root.dataset.viewerReady = this.jobId;
  }

  destroy() {
    this.abort.abort();
    this.el("planes").replaceChildren();
    delete this.root.dataset.viewerReady;
  }

  buildPlanes() {
    const container = this.el("planes");
    container.replaceChildren();
    for (const name of PLANES) {
      const plane = this.geometry.planes[name];
      const [w, h] = canvasSize(plane);
      this.index[name] = this.startSlice(plane);
      const figure = document.createElement("figure");
      figure.className = "plane";
      figure.dataset.plane = name;
      figure.innerHTML = `
        <figcaption>${title(name)}</figcaption>
        <div class="pair">
          <div class="view">
            <canvas class="fixed-view" width="${w}" height="${h}" tabindex="0" role="img"
                    aria-describedby="${name}-keys"
                    aria-label="${title(name)} slice of the fixed image"></canvas>
            <span class="view-label">Fixed</span>
          </div>
          <div class="view">
            <canvas class="moving-view" width="${w}" height="${h}" role="img"
                    aria-label="${title(name)} slice of the moving image"></canvas>
            <span class="view-label moving-label">Moving</span>
          </div>
        </div>
        <div class="field">
          <label for="slice-${name}">${title(name)} slice</label>
          <input id="slice-${name}" type="range" min="0" max="${plane.count - 1}" step="1"
                 value="${this.index[name]}">
          <output for="slice-${name}"></output>
        </div>
        <p class="note"></p>
        <p id="${name}-keys" class="visually-hidden">Press Enter to mark the centre pixel;
          arrow keys move the marked point within this plane.</p>`;
      container.append(figure);
      const fixedCanvas = figure.querySelector(".fixed-view");
      const slider = figure.querySelector("input[type=range]");
      const signal = this.abort.signal;
      slider.addEventListener("input", () => {
        this.index[name] = Number(slider.value);
        this.renderPlane(name);
      }, { signal });
      fixedCanvas.addEventListener("click", (event) => this.onClick(name, event), { signal });
      fixedCanvas.addEventListener("keydown", (event) => this.onKey(name, event), { signal });
    }
  }

  // The first slice: through the job's view point (the centre of the region where the
  // registered moving image has data, as in qa.png), else the middle one (older servers).
  startSlice(plane) {
    const p = this.geometry.view_point_mm;
    const middle = Math.floor((plane.count - 1) / 2);
    if (!Array.isArray(p) || p.length !== 3 || !p.every(Number.isFinite)) return middle;
    const s = Math.round(R.apply4(plane.physical_to_pixel, p)[2]);
    return Number.isFinite(s) ? Math.min(plane.count - 1, Math.max(0, s)) : middle;
  }

  bindControls() {
    const signal = this.abort.signal;
    const form = this.el("display-form");
    form.addEventListener("change", () => {
      this.describePoint();
      this.renderAll();
    }, { signal });
    form.addEventListener("submit", (event) => event.preventDefault(), { signal });
    this.el("opacity").addEventListener("input", () => {
      this.el("opacity-value").textContent = `${this.el("opacity").value}%`;
      this.renderAll();
    }, { signal });
    this.el("point-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const p = ["x", "y", "z"].map((k) => Number(this.el(`point-${k}`).value));
      if (p.every(Number.isFinite)) this.setPoint(p, null);
    }, { signal });
    this.el("heatmap-run").addEventListener("click", () => this.runHeatmaps(), { signal });
    this.el("heatmap-plane").addEventListener("change", () => {
      if (this.point) this.runHeatmaps();
    }, { signal });
  }

  async slice(volume, plane, index) {
    const key = `${volume}/${plane}/${index}`;
    let entry = this.slices.get(key);
    if (!entry) {
      entry = getBytes(jobPath(this.jobId, `/slices/${volume}/${plane}/${index}?format=raw`));
      this.slices.set(key, entry);
      entry.catch(() => this.slices.delete(key));
      if (this.slices.size > SLICE_CACHE) this.slices.delete(this.slices.keys().next().value);
    }
    return entry;
  }

  async renderAll() {
    await Promise.all(PLANES.map((name) => this.renderPlane(name)));
  }

  async renderPlane(name) {
    const plane = this.geometry.planes[name];
    const index = this.index[name];
    const token = (this.tokens[name] = (this.tokens[name] || 0) + 1);
    const figure = this.el("planes").querySelector(`figure[data-plane=${name}]`);
    const movingVolume = this.stage === "after" ? "registered" : "before";
    let fixed;
    let moving;
    try {
      [fixed, moving] = await Promise.all([
        this.slice("fixed", name, index), this.slice(movingVolume, name, index)]);
    } catch (err) {
      this.el("viewer-status").textContent = describeError(err);
      return;
    }
    if (token !== this.tokens[name] || this.abort.signal.aborted) return;
    const { width, height } = plane;
    const fixedCanvas = figure.querySelector(".fixed-view");
    const movingCanvas = figure.querySelector(".moving-view");
    R.drawScaled(fixedCanvas, R.grey(fixed, width, height));
    const tile = Math.max(1, Math.round(Math.min(width, height) / 8));
    const composite = {
      moving: () => R.grey(moving, width, height),
      blend: () => R.blend(fixed, moving, width, height, this.opacity),
      checkerboard: () => R.checkerboard(fixed, moving, width, height, tile),
      edges: () => R.edges(fixed, moving, width, height),
    }[this.overlay]();
    R.drawScaled(movingCanvas, composite);
    R.drawLetters(fixedCanvas, plane.letters);
    R.drawLetters(movingCanvas, plane.letters);

    const stageText = this.stage === "after" ? "registered" : "before registration (identity)";
    const overlayText = { moving: "moving only", blend: `blend, ${Math.round(this.opacity * 100)}% moving`,
      checkerboard: "checkerboard", edges: "moving edges on fixed" }[this.overlay];
    figure.querySelector(".moving-label").textContent = `Moving, ${stageText} — ${overlayText}`;
    movingCanvas.setAttribute("aria-label",
      `${title(name)} slice ${index + 1}: moving image ${stageText}, ${overlayText}`);
    fixedCanvas.setAttribute("aria-label", `${title(name)} slice ${index + 1} of the fixed image`);
    const slider = figure.querySelector("input[type=range]");
    slider.value = String(index);
    const centre = R.apply4(plane.pixel_to_physical, [(width - 1) / 2, (height - 1) / 2, index]);
    const along = { axial: 2, coronal: 1, sagittal: 0 }[name];
    const where = `${"xyz"[along]} = ${centre[along].toFixed(1)} mm`;
    slider.setAttribute("aria-valuetext", `slice ${index + 1} of ${plane.count}, ${where}`);
    figure.querySelector("output").textContent = `${index + 1} / ${plane.count} (${where})`;

    figure.querySelector(".note").textContent = this.drawPoint(name, fixedCanvas, movingCanvas);
    fixedCanvas.dataset.rendered = String(Number(fixedCanvas.dataset.rendered || 0) + 1);
    movingCanvas.dataset.rendered = String(Number(movingCanvas.dataset.rendered || 0) + 1);
  }

  // Marks p on the fixed view and its counterpart on the moving view; returns a note.
  drawPoint(name, fixedCanvas, movingCanvas) {
    if (!this.point) return "";
    const plane = this.geometry.planes[name];
    const index = this.index[name];
    const normalSpacing = this.geometry.spacing[plane.normal_axis];
    const [c, r, s] = R.apply4(plane.physical_to_pixel, this.point);
    const [fx, fy] = R.toCanvas(fixedCanvas, plane.width, plane.height, c, r);
    R.drawMarker(fixedCanvas, fx, fy, { colour: FIXED_COLOUR, dashed: Math.abs(s - index) > 0.5 });
    // After registration the registered image shows the moving anatomy at the fixed
    // point's own position; before it (identity), that anatomy sits at T p.
    const target = this.stage === "after" ? this.point : this.moved;
    if (!target) return "";
    const [mc, mr, ms] = R.apply4(plane.physical_to_pixel, target);
    const off = Math.abs(ms - index) * normalSpacing;
    const [mx, my] = R.toCanvas(movingCanvas, plane.width, plane.height, mc, mr);
    R.drawMarker(movingCanvas, mx, my, { colour: MOVING_COLOUR, dashed: off > normalSpacing / 2 });
    if (this.stage === "before" && off > normalSpacing / 2) {
      return `T(p) lies ${off.toFixed(1)} mm from this slice (dashed marker: its projection).`;
    }
    return "";
  }

  onClick(name, event) {
    const plane = this.geometry.planes[name];
    const rect = event.currentTarget.getBoundingClientRect();
    const column = Math.round((event.clientX - rect.left) / rect.width * plane.width - 0.5);
    const row = Math.round((event.clientY - rect.top) / rect.height * plane.height - 0.5);
    this.markPixel(name, column, row);
  }

  onKey(name, event) {
    const plane = this.geometry.planes[name];
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    let column;
    let row;
    if (this.point && (moves[event.key] || event.key === "Enter" || event.key === " ")) {
      [column, row] = R.apply4(plane.physical_to_pixel, this.point).map(Math.round);
    } else if (event.key === "Enter" || event.key === " ") {
      [column, row] = [Math.floor(plane.width / 2), Math.floor(plane.height / 2)];
    } else if (moves[event.key]) {
      [column, row] = [Math.floor(plane.width / 2), Math.floor(plane.height / 2)];
    } else {
      return;
    }
    event.preventDefault();
    const [dc, dr] = moves[event.key] || [0, 0];
    this.markPixel(name, column + dc, row + dr);
  }

  markPixel(name, column, row) {
    const plane = this.geometry.planes[name];
    const c = Math.min(plane.width - 1, Math.max(0, column));
    const r = Math.min(plane.height - 1, Math.max(0, row));
    this.setPoint(R.apply4(plane.pixel_to_physical, [c, r, this.index[name]]), name);
  }

  // Marks fixed point p (LPS mm): every plane moves to the slice through it.
  async setPoint(p, fromPlane) {
    this.point = p;
    this.moved = null;
    for (const name of PLANES) {
      const plane = this.geometry.planes[name];
      const s = Math.round(R.apply4(plane.physical_to_pixel, p)[2]);
      this.index[name] = Math.min(plane.count - 1, Math.max(0, s));
    }
    ["x", "y", "z"].forEach((k, i) => { this.el(`point-${k}`).value = p[i].toFixed(2); });
    if (this.geometry.mapping === "linear") {
      this.moved = R.apply4(this.geometry.matrix_fixed_to_moving, p);
    } else {  // non-linear job: T p = p + u(p), from the server's displacement field
      const [x, y, z] = p;
      try {
        const answer = await getJson(jobPath(this.jobId, `/point?${new URLSearchParams({ x, y, z })}`));
        if (this.point !== p) return;
        this.moved = answer.moving_point_mm;
      } catch (err) {
        if (this.point !== p) return;
        this.el("viewer-status").textContent = `T(p): ${describeError(err)}`;
      }
    }
    this.describePoint();
    if (fromPlane) this.el("heatmap-plane").value = fromPlane;
    this.renderAll();
    this.runHeatmaps();
  }

  // The marked point in words: p, where the cyan mark is, and T(p).
  describePoint() {
    const p = this.point;
    if (!p) return;
    const moved = this.moved;
    const info = this.el("point-info");
    info.replaceChildren();
    const lines = [
      `Fixed point p = ${fmt(p)} mm (LPS), marked in yellow on the fixed image.`,
      this.stage === "after"
        ? "Registered view: the same physical point, marked in cyan."
        : "Before view: the moving anatomy at p lies at T(p), marked in cyan.",
      moved ? `Moving image frame: T(p) = ${fmt(moved)} mm (LPS).`
        : "Moving image frame: T(p) is not defined here.",
    ];
    for (const text of lines) {
      const line = document.createElement("p");
      line.textContent = text;
      info.append(line);
    }
    info.dataset.fixed = JSON.stringify(p);
    info.dataset.moving = JSON.stringify(moved);
  }

  resetHeatmaps() {
    for (const similarity of ["disa", "mind"]) {
      const canvas = this.el(`heatmap-${similarity}`);
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
      delete canvas.dataset.state;
      this.el(`heatmap-${similarity}-status`).textContent = "Mark a point to compute this map.";
    }
  }

  async runHeatmaps() {
    if (!this.point) {
      this.resetHeatmaps();
      return;
    }
    const token = ++this.heatmapToken;
    const plane = this.el("heatmap-plane").value;
    await Promise.all(["disa", "mind"].map((s) => this.heatmap(s, plane, token)));
  }

  async heatmap(similarity, planeName, token) {
    const canvas = this.el(`heatmap-${similarity}`);
    const status = this.el(`heatmap-${similarity}-status`);
    const label = similarity === "disa" ? "DISA" : "MIND-SSC";
    const unavailable = this.geometry.heatmaps[similarity];
    if (unavailable) {  // known from GET .../viewer: no request that would answer 409
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
      canvas.dataset.state = "error";
      status.textContent = `${label}: ${unavailable}`;
      return;
    }
    status.textContent = `Computing the ${label} map…`;
    canvas.dataset.state = "busy";
    const [x, y, z] = this.point;
    const query = new URLSearchParams({ x, y, z, plane: planeName, similarity });
    let map;
    try {
      map = await getJson(jobPath(this.jobId, `/heatmap?${query}`));
    } catch (err) {
      if (token !== this.heatmapToken) return;
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
      canvas.dataset.state = "error";
      status.textContent = `${label}: ${describeError(err)}`;
      return;
    }
    if (token !== this.heatmapToken || this.abort.signal.aborted) return;
    const plane = this.geometry.planes[planeName];
    [canvas.width, canvas.height] = canvasSize(plane);
    const { image, min, max } = R.colourMap(map.values, map.width, map.height);
    R.drawScaled(canvas, image, "#000");
    R.drawLetters(canvas, plane.letters);
    const [px, py] = R.toCanvas(canvas, map.width, map.height, ...map.point_pixel);
    R.drawMarker(canvas, px, py, { colour: "#ffffff" });
    let peakText = "no values on this slice";
    if (map.peak) {
      const [kx, ky] = R.toCanvas(canvas, map.width, map.height, map.peak.column, map.peak.row);
      R.drawMarker(canvas, kx, ky, { shape: "ring", colour: "#ff4081" });
      const distance = Math.hypot(...map.peak.point_mm.map((v, i) => v - map.point_mm[i]));
      peakText = `peak at ${fmt(map.peak.point_mm)} mm, ${distance.toFixed(1)} mm from the point`;
    }
    const kind = map.kind === "dot" ? "dot product" : "negative squared distance";
    canvas.setAttribute("aria-label", `${label} similarity heatmap, ${planeName} slice ${map.slice + 1}: ${peakText}`);
    status.textContent = `${label} (${kind}), ${planeName} slice ${map.slice + 1}: values ` +
      `${Number.isFinite(min) ? min.toPrecision(3) : "–"} (dark blue) to ` +
      `${Number.isFinite(max) ? max.toPrecision(3) : "–"} (yellow); ${peakText}.`;
    canvas.dataset.state = "ready";
  }
}
