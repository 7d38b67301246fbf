// The similarity heatmaps of the viewer's marked point (the paper's Figure 1), drawn with a
// colour bar and an answer in words: the point's rank on the slice and the nearest local
// peak (GET /v1/jobs/{id}/heatmap computes both).

import { describeError, getJson, jobPath } from "./api.js";
import * as R from "./render.js";
import { fitSize } from "./viewport.js";

const HEATMAP_BOX = 240; // longest side of a heatmap canvas (px)

export function resetHeatmaps(viewer) {
  for (const similarity of ["disa", "mind"]) {
    const canvas = viewer.el(`heatmap-${similarity}`);
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    delete canvas.dataset.state;
    viewer.el(`heatmap-${similarity}-status`).textContent = "Mark a point to compute this map.";
  }
}

export async function runHeatmaps(viewer) {
  if (!viewer.point) {
    resetHeatmaps(viewer);
    return;
  }
  const token = ++viewer.heatmapToken;
  const plane = viewer.el("heatmap-plane").value;
  await Promise.all(["disa", "mind"].map((s) => drawHeatmap(viewer, s, plane, token)));
}

async function drawHeatmap(viewer, similarity, planeName, token) {
  const canvas = viewer.el(`heatmap-${similarity}`);
  const status = viewer.el(`heatmap-${similarity}-status`);
  const label = similarity === "disa" ? "DISA" : "MIND-SSC";
  const unavailable = viewer.geometry.heatmaps[similarity];
  if (unavailable) {  // known from GET .../viewer: no request that would answer 409
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.state = "error";
    status.textContent = `${label}: ${unavailable}`;
    return;
  }
  status.textContent = `Computing the ${label} map…`;
  canvas.dataset.state = "busy";
  const [x, y, z] = viewer.point;
  const query = new URLSearchParams({ x, y, z, plane: planeName, similarity });
  let map;
  try {
    map = await getJson(jobPath(viewer.jobId, `/heatmap?${query}`));
  } catch (err) {
    if (token !== viewer.heatmapToken) return;
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.state = "error";
    status.textContent = `${label}: ${describeError(err)}`;
    return;
  }
  if (token !== viewer.heatmapToken || viewer.abort.signal.aborted) return;
  const plane = viewer.geometry.planes[planeName];
  [canvas.width, canvas.height] = fitSize(plane, HEATMAP_BOX);
  const { image, min, max } = R.colourMap(map.values, map.width, map.height);
  R.drawScaled(canvas, image, "#000");
  R.drawLetters(canvas, plane.letters);
  const [px, py] = R.toCanvas(canvas, map.width, map.height, ...map.point_pixel);
  R.drawMarker(canvas, px, py, { colour: "#ffffff" });
  const peak = map.nearest_peak;
  if (peak) {
    const [kx, ky] = R.toCanvas(canvas, map.width, map.height, peak.column, peak.row);
    R.drawMarker(canvas, kx, ky, { shape: "ring", colour: "#ff4081" });
  }
  viewer.el(`heatmap-${similarity}-low`).textContent = Number.isFinite(min) ? min.toPrecision(3) : "–";
  viewer.el(`heatmap-${similarity}-high`).textContent = Number.isFinite(max) ? max.toPrecision(3) : "–";
  const answer = heatmapAnswer(map);
  const kind = map.kind === "dot" ? "dot product" : "negative squared distance";
  canvas.setAttribute("aria-label", `${label} similarity heatmap, ${planeName} slice ${map.slice + 1}: ${answer}`);
  status.textContent = `${label} (${kind}, higher = more alike), ${planeName} slice `
    + `${map.slice + 1}: ${answer}.`;
  canvas.dataset.percentile = String(map.point_percentile ?? "");
  canvas.dataset.state = "ready";
}

// The heatmap's answer in words: how the point ranks on its slice and how far the nearest
// local peak lies (the slice's global peak is named too, but it answers another question).
export function heatmapAnswer(map) {
  if (!Number.isFinite(map.point_percentile)) {
    return "no value at the point (the moving image has no data there)";
  }
  const top = 100 - map.point_percentile;
  const rankText = map.point_rank === 1 ? "the highest value on this slice"
    : `in the top ${top < 0.1 ? "0.1" : top.toFixed(1)}% of this slice (rank ${map.point_rank})`;
  let text = `the point's value is ${rankText}`;
  const near = map.nearest_peak;
  if (near) {
    text += near.distance_mm < 0.05 ? "; the point is on a local peak"
      : `; nearest local peak ${near.distance_mm.toFixed(1)} mm away (pink ring)`;
  }
  if (map.peak) {
    const far = Math.hypot(...map.peak.point_mm.map((v, i) => v - map.point_mm[i]));
    text += `; the slice's highest value lies ${far.toFixed(1)} mm away`;
  }
  return text;
}
