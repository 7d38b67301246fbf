// The result viewer: three orthogonal planes of the fixed grid, each a pair of canvases
// (fixed | moving compared with fixed: fusion, grey blend, edges, checkerboard), window and
// level per image, wheel to scroll slices, zoom and pan, a crosshair linked across the
// planes, a scale bar, a point picker and the similarity heatmaps.
//
// Geometry comes from GET /v1/jobs/{id}/viewer: per plane a 4x4 matrix from
// (column, row, slice, 1) to LPS mm and its inverse, and the job's 4x4 matrix T that
// maps a fixed point p to the corresponding moving point T p (LPS mm). Non-linear jobs
// (mapping "displacement") get T p from GET .../point instead.

import { describeError, getBytes, getJson, jobPath } from "./api.js";
import * as R from "./render.js";
import { resetHeatmaps, runHeatmaps } from "./heatmaps.js";
import {
  MAX_ZOOM, MIN_ZOOM, View, drawCrosshair, drawScaleBar, fitSize,
} from "./viewport.js";

const PLANES = ["axial", "coronal", "sagittal"];
const MIN_BOX = 160; // smallest side of a canvas box (px)
const MAX_BOX = 440; // largest
const SLICE_CACHE = 240; // slices kept in memory
const FIXED_COLOUR = "#ffd700";
const MOVING_COLOUR = "#00e5ff";
const WHEEL_NOTCH = 50; // wheel delta (px) of one slice
const DRAG_PX = 4; // a pointer moved further than this pans instead of marking a point
// Window presets: [width, level] in image units (Hounsfield units for CT); auto = the
// service's own window from the image's percentiles (right for MR).
const PRESETS = { "ct-soft": [400, 40], "ct-bone": [1800, 400] };

const title = (s) => s.charAt(0).toUpperCase() + s.slice(1);
const fmt = (p) => `(${p.map((v) => v.toFixed(1)).join(", ")})`;
const round = (v) => Number(v.toPrecision(4));

export class Viewer {
  constructor(jobId, root, job = null) {
    this.jobId = jobId;
    this.root = root;
    this.job = job;
    this.el = (id) => root.querySelector(`#${id}`);
    this.slices = new Map();
    this.index = {};
    this.tokens = {};
    this.views = {}; // plane -> View (zoom and pan)
    this.zoom = 1; // shared by the three planes
    this.box = 0; // current canvas box (px)
    this.windows = { fixed: null, moving: null }; // [width, level]; null: the service's auto
    this.point = null;
    this.moved = null; // T(point), LPS mm
    this.heatmapToken = 0;
    this.drag = null;
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
    this.initWindows();
    // Non-linear jobs: the displacement overlay is one more comparison.
    const field = this.geometry.volumes.includes("displacement");
    this.el("overlay-deformation-label").hidden = !field;
    if (!field && this.overlay === "deformation") {
      this.el("display-form").elements.overlay.value = "fusion";
    }
    this.observeSize();
    this.resizeCanvases(this.box);
    resetHeatmaps(this);
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
    if (this.resizer) this.resizer.disconnect();
    this.el("planes").replaceChildren();
    delete this.root.dataset.viewerReady;
  }

  buildPlanes() {
    const container = this.el("planes");
    container.replaceChildren();
    for (const name of PLANES) {
      const plane = this.geometry.planes[name];
      const [w, h] = fitSize(plane, this.boxSize());
      this.index[name] = this.startSlice(plane);
      this.views[name] = new View(plane.width, plane.height);
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
            <canvas class="moving-view" width="${w}" height="${h}" tabindex="0" role="img"
                    aria-describedby="${name}-keys"
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
          arrow keys move the marked point within this plane; Page Up and Page Down change
          the slice.</p>`;
      container.append(figure);
      const slider = figure.querySelector("input[type=range]");
      const signal = this.abort.signal;
      slider.addEventListener("input", () => {
        this.index[name] = Number(slider.value);
        this.renderPlane(name);
      }, { signal });
      for (const canvas of figure.querySelectorAll("canvas")) {
        canvas.addEventListener("click", (event) => this.onClick(name, event), { signal });
        canvas.addEventListener("keydown", (event) => this.onKey(name, event), { signal });
        canvas.addEventListener("wheel", (event) => this.onWheel(name, event),
          { signal, passive: false });
        canvas.addEventListener("pointerdown", (event) => this.onPointerDown(name, event),
          { signal });
        canvas.addEventListener("pointermove", (event) => this.onPointerMove(name, event),
          { signal });
      }
    }
  }

  // The side of each canvas's box: the fixed and the comparison canvas side by side fill a
  // plane's figure (the figures' columns come from style.css), within MIN_BOX..MAX_BOX.
  boxSize() {
    const figure = this.el("planes").querySelector("figure.plane");
    const width = figure ? figure.clientWidth : (this.el("planes").clientWidth || 720);
    const box = (width - 2 * 9 - 8) / 2; // figure padding and border, the pair's gap
    return Math.floor(Math.max(MIN_BOX, Math.min(MAX_BOX, box)));
  }

  // Canvases follow the viewer's width: resized and redrawn when the box changes.
  observeSize() {
    this.box = this.boxSize();
    if (typeof ResizeObserver === "undefined") return;
    let pending = false;
    this.resizer = new ResizeObserver(() => {
      if (pending || this.abort.signal.aborted) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        // (The viewer may have been closed between the resize and this frame: its figures
        // are gone then, and there is nothing to redraw.)
        if (this.abort.signal.aborted) return;
        const box = this.boxSize();
        if (box === this.box) return;
        this.resizeCanvases(box);
        this.renderAll();
      });
    });
    this.resizer.observe(this.el("planes"));
  }

  resizeCanvases(box) {
    this.box = box;
    for (const name of PLANES) {
      const [w, h] = fitSize(this.geometry.planes[name], box);
      for (const canvas of this.figure(name).querySelectorAll("canvas")) {
        [canvas.width, canvas.height] = [w, h];
      }
    }
  }

  // The largest displacement (mm) of a non-linear job: the top of its overlay's scale.
  largestShift() {
    const window = this.geometry.windows.displacement;
    return window ? window[1].toFixed(1) : "?";
  }

  figure(name) {
    return this.el("planes").querySelector(`figure[data-plane=${name}]`);
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
    this.el("heatmap-run").addEventListener("click", () => runHeatmaps(this), { signal });
    for (const box of this.root.querySelectorAll(".window-level")) {
      const image = box.dataset.image;
      box.querySelector(".wl-preset").addEventListener("change", (event) => {
        event.stopPropagation();
        this.applyPreset(image, event.target.value);
      }, { signal });
      for (const input of box.querySelectorAll("input")) {
        input.addEventListener("change", (event) => {
          event.stopPropagation();
          this.applyCustomWindow(image);
        }, { signal });
      }
    }
    this.el("zoom-in").addEventListener("click", () => this.setZoom(this.zoom * 1.5), { signal });
    this.el("zoom-out").addEventListener("click", () => this.setZoom(this.zoom / 1.5), { signal });
    this.el("zoom-reset").addEventListener("click", () => this.setZoom(1), { signal });
    window.addEventListener("pointerup", () => this.onPointerUp(), { signal });
    this.el("heatmap-plane").addEventListener("change", () => {
      if (this.point) runHeatmaps(this);
    }, { signal });
  }

  // ------------------------------------------------------------ window and level

  // The inputs show the service's auto windows until the user picks another.
  initWindows() {
    for (const image of ["fixed", "moving"]) {
      this.el(`wl-${image}-preset`).value = "auto";
      this.showWindow(image, this.autoWindow(image));
    }
  }

  autoWindow(image) {
    const [low, high] = this.geometry.windows[image];
    return [high - low, (low + high) / 2];
  }

  showWindow(image, [width, level]) {
    this.el(`wl-${image}-window`).value = String(round(width));
    this.el(`wl-${image}-level`).value = String(round(level));
  }

  applyPreset(image, preset) {
    if (preset === "custom") return this.applyCustomWindow(image);
    const chosen = preset === "auto" ? null : PRESETS[preset];
    this.windows[image] = chosen;
    this.showWindow(image, chosen || this.autoWindow(image));
    return this.renderAll();
  }

  applyCustomWindow(image) {
    const width = Number(this.el(`wl-${image}-window`).value);
    const level = Number(this.el(`wl-${image}-level`).value);
    if (!(width > 0) || !Number.isFinite(level)) return undefined;
    this.el(`wl-${image}-preset`).value = "custom";
    this.windows[image] = [width, level];
    return this.renderAll();
  }

  // ------------------------------------------------------------------ zoom and pan

  setZoom(zoom) {
    this.zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, zoom));
    for (const name of PLANES) {
      let around = null;
      if (this.point) {
        const [c, r] = R.apply4(this.geometry.planes[name].physical_to_pixel, this.point);
        around = [c, r];
      }
      this.views[name].setZoom(this.zoom, around);
    }
    this.el("zoom-value").textContent = `${Math.round(this.zoom * 100)}%`;
    this.el("planes").dataset.zoom = String(this.zoom);
    return this.renderAll();
  }

  // One slice (or zoom step) per notch of a mouse wheel; a touchpad's many small deltas
  // add up to a notch first, so the slices do not race past.
  onWheel(name, event) {
    event.preventDefault();
    const unit = event.deltaMode === 1 ? 40 : event.deltaMode === 2 ? 800 : 1; // lines, pages
    this.wheel = (this.wheel || 0) + event.deltaY * unit;
    if (Math.abs(this.wheel) < WHEEL_NOTCH) return;
    const step = Math.sign(this.wheel);
    this.wheel = 0;
    if (event.ctrlKey || event.metaKey) {
      this.setZoom(this.zoom * (step < 0 ? 1.25 : 0.8));
      return;
    }
    this.moveSlice(name, step);
  }

  moveSlice(name, step) {
    const plane = this.geometry.planes[name];
    const next = Math.min(plane.count - 1, Math.max(0, this.index[name] + step));
    if (next === this.index[name]) return;
    this.index[name] = next;
    this.renderPlane(name);
  }

  onPointerDown(name, event) {
    if (event.button !== 0) return;
    this.drag = { name, x: event.clientX, y: event.clientY, moved: false, canvas: event.currentTarget };
  }

  onPointerMove(name, event) {
    const drag = this.drag;
    if (!drag || drag.name !== name || !(event.buttons & 1)) return;
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    if (!drag.moved && Math.hypot(dx, dy) < DRAG_PX) return;
    drag.moved = true;
    const rect = drag.canvas.getBoundingClientRect();
    const scale = drag.canvas.width / rect.width;
    this.views[name].pan(drag.canvas, dx * scale, dy * scale);
    drag.x = event.clientX;
    drag.y = event.clientY;
    this.renderPlane(name);
  }

  onPointerUp() {
    if (this.drag && this.drag.moved) this.dragged = true;
    this.drag = null;
  }

  // ---------------------------------------------------------------------- slices

  async slice(volume, plane, index) {
    const chosen = volume === "displacement" ? null
      : this.windows[volume === "fixed" ? "fixed" : "moving"];
    const query = chosen ? `&window=${chosen[0]}&level=${chosen[1]}` : "";
    const key = `${volume}/${plane}/${index}${query}`;
    let entry = this.slices.get(key);
    if (!entry) {
      entry = getBytes(jobPath(this.jobId, `/slices/${volume}/${plane}/${index}?format=raw${query}`));
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
    const figure = this.figure(name);
    const movingVolume = this.overlay === "deformation" ? "displacement"
      : this.stage === "after" ? "registered" : "before";
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
    const view = this.views[name];
    const fixedCanvas = figure.querySelector(".fixed-view");
    const movingCanvas = figure.querySelector(".moving-view");
    view.draw(fixedCanvas, R.grey(fixed, width, height));
    const tile = Math.max(1, Math.round(Math.min(width, height) / 8));
    const composite = {
      moving: () => R.grey(moving, width, height),
      fusion: () => R.fusion(fixed, moving, width, height, this.opacity),
      blend: () => R.blend(fixed, moving, width, height, this.opacity),
      checkerboard: () => R.checkerboard(fixed, moving, width, height, tile),
      edges: () => R.edges(fixed, moving, width, height),
      deformation: () => R.heatOverlay(fixed, moving, width, height, Math.max(0.2, this.opacity)),
    }[this.overlay]();
    view.draw(movingCanvas, composite);
    for (const canvas of [fixedCanvas, movingCanvas]) {
      R.drawLetters(canvas, plane.letters);
      drawScaleBar(canvas, view, plane.pixel_spacing_mm[0]);
    }

    const stageText = this.stage === "after" ? "registered" : "before registration (identity)";
    const share = Math.round(this.opacity * 100);
    const overlayText = { moving: "moving only",
      fusion: `fusion, fixed green, moving magenta (${share}% moving)`,
      blend: `grey blend, ${share}% moving`,
      checkerboard: "checkerboard", edges: "moving edges on fixed",
      deformation: `displacement |u| on the fixed image, 0 (dark blue) to ${this.largestShift()} mm (yellow)`,
    }[this.overlay];
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
    const view = this.views[name];
    const [c, r, s] = R.apply4(plane.physical_to_pixel, this.point);
    const [fx, fy] = view.toCanvas(fixedCanvas, c, r);
    const off = Math.abs(s - index) > 0.5;
    // The crosshair through p on both canvases: the three planes meet there.
    drawCrosshair(fixedCanvas, fx, fy, FIXED_COLOUR, off);
    drawCrosshair(movingCanvas, fx, fy, FIXED_COLOUR, off);
    fixedCanvas.dataset.crosshair = JSON.stringify([c, r]);
    R.drawMarker(fixedCanvas, fx, fy, { colour: FIXED_COLOUR, dashed: off });
    // After registration the registered image shows the moving anatomy at the fixed
    // point's own position; before it (identity), that anatomy sits at T p.
    const target = this.stage === "after" ? this.point : this.moved;
    if (!target) return "";
    const [mc, mr, ms] = R.apply4(plane.physical_to_pixel, target);
    const distance = Math.abs(ms - index) * normalSpacing;
    const [mx, my] = view.toCanvas(movingCanvas, mc, mr);
    R.drawMarker(movingCanvas, mx, my, { colour: MOVING_COLOUR, dashed: distance > normalSpacing / 2 });
    if (this.stage === "before" && distance > normalSpacing / 2) {
      return `T(p) lies ${distance.toFixed(1)} mm from this slice (dashed marker: its projection).`;
    }
    return "";
  }

  onClick(name, event) {
    if (this.dragged) { // the end of a pan, not a click
      this.dragged = false;
      return;
    }
    const canvas = event.currentTarget;
    const rect = canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) * canvas.width) / rect.width;
    const y = ((event.clientY - rect.top) * canvas.height) / rect.height;
    const [column, row] = this.views[name].toPixel(canvas, x, y).map(Math.round);
    this.markPixel(name, column, row);
  }

  onKey(name, event) {
    const plane = this.geometry.planes[name];
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (event.key === "PageUp" || event.key === "PageDown") {
      event.preventDefault();
      this.moveSlice(name, event.key === "PageUp" ? 1 : -1);
      return;
    }
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
      const [c, r, s] = R.apply4(plane.physical_to_pixel, p);
      this.index[name] = Math.min(plane.count - 1, Math.max(0, Math.round(s)));
      // Zoomed in: the other planes follow the point so that the crosshair stays in view.
      if (name !== fromPlane && this.zoom > 1) this.views[name].setZoom(this.zoom, [c, r]);
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
    runHeatmaps(this);
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
}
