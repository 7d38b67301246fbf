// The result in words: the verdict with its evidence, the run's figures and the transform
// in human terms (rotation in degrees about a stated centre, translation in mm, an
// affine's scale and shear, a deformable run's Jacobian figures).
//
// The evidence text is the service's own (result.json's verdict_evidence, which qa.png's
// title and `disa register` print too), so every view shows the same numbers; results
// written before that field existed get the same wording from evidenceText().

export const VERDICT_WORDS = {
  likely: "Likely correct",
  uncertain: "Check before use",
  failed: "Failed",
};

const percent = (f) => `${Math.round(100 * f)}%`;
const fixed = (v, digits) => Number(v).toFixed(digits);
const vector = (values, digits, unit) => values.map((v) => `${fixed(v, digits)}${unit}`).join(", ");

// The evidence line, as registration/readable.py's verdict_evidence words it.
export function evidenceText(r) {
  if (!r) return "";
  if (typeof r.verdict_evidence === "string") return r.verdict_evidence;
  const parts = [];
  if (Number.isInteger(r.refined_solutions) && r.refined_solutions > 1) {
    parts.push(`${r.agreeing_solutions} of ${r.refined_solutions} refined solutions agree`);
  } else if (r.refined_solutions === 1) {
    parts.push("a single refined solution");
  }
  if (Number.isFinite(r.match_quality)) {
    parts.push(`match quality ${fixed(r.match_quality, 2)} (0 chance, 1 perfect)`);
  }
  if (Number.isFinite(r.overlap)) parts.push(`overlap ${percent(r.overlap)}`);
  if (r.ambiguous) parts.push("another pose scores almost as well");
  return parts.join(", ");
}

// Fill the verdict box: the verdict in words and colour, why, and the evidence.
export function showVerdict(box, r) {
  const verdict = r && r.verdict;
  box.dataset.verdict = verdict || "none";
  box.replaceChildren();
  const word = document.createElement("p");
  word.className = "verdict-word";
  const reason = document.createElement("p");
  reason.className = "verdict-reason";
  const evidence = document.createElement("p");
  evidence.className = "verdict-evidence";
  if (!verdict) {
    word.textContent = "No verdict";
    reason.textContent = "This result was written before the service gave verdicts: "
      + "check the QA picture and the viewer.";
    box.append(word, reason);
    return;
  }
  word.textContent = `${VERDICT_WORDS[verdict] || verdict} (${verdict})`;
  reason.textContent = verdict === "likely"
    ? "The checks below all passed. Still look at the images before clinical use."
    : `Why: ${r.verdict_reason}. Check the QA picture and the viewer before using this transform.`;
  evidence.textContent = `Evidence: ${evidenceText(r)}.`;
  box.append(word, reason, evidence);
}

// Rows (name, value) of the run's figures, the verdict's inputs first.
export function summaryRows(job) {
  const r = job.result || {};
  const rows = [
    ["Refined solutions agreeing", r.refined_solutions === undefined ? undefined
      : `${r.agreeing_solutions} of ${r.refined_solutions} (within 5 mm of the best)`],
    ["Match quality", Number.isFinite(r.match_quality)
      ? `${fixed(r.match_quality, 2)} (0 chance, 1 perfect)` : undefined],
    ["Overlap", Number.isFinite(r.overlap)
      ? `${percent(r.overlap)} of the ${r.sampled_image || "sampled"} image on the other's data`
      : undefined],
    ["Another pose nearly as good", r.ambiguous === undefined ? undefined
      : (r.ambiguous ? "yes" : "no")],
    ["Mode", r.mode],
    ["Similarity", r.similarity],
    ["Similarity value", r.similarity_value === undefined ? undefined
      : Number(r.similarity_value).toPrecision(4)],
    ["Random starts", r.starts],
    ["Objective evaluations", r.evaluations],
    ["Working spacing", r.working_spacing_mm === undefined ? undefined
      : `${r.working_spacing_mm} mm`],
    ["Run time", job.timings && Number.isFinite(job.timings.run_s)
      ? `${job.timings.run_s.toFixed(1)} s` : undefined],
  ];
  return rows.filter(([, value]) => value !== undefined && value !== null);
}

// Rows (name, value) of the transform in human terms; [] when the job has none.
export function transformRows(r) {
  const t = r && r.transform_description;
  if (!t) return [];
  const rows = [
    ["Direction", "fixed → moving: a point x of the fixed image corresponds to the point "
      + "T(x) of the moving image (LPS mm; transform.tfm's convention)"],
    ["Rotation (x, y, z)", `${vector(t.rotation_deg, 2, "°")}`],
    ["Rotation convention", `${t.rotation_convention}; in all ${fixed(t.rotation_angle_deg, 2)}° `
      + "about one axis"],
    ["Rotation centre", `(${vector(t.centre_mm, 1, "")}) mm LPS, ${t.centre}`],
    ["Translation of the centre", `${vector(t.translation_mm, 2, " mm")} `
      + `(${fixed(t.translation_length_mm, 2)} mm in all)`],
  ];
  if (t.scale) {
    rows.push(["Scale (x, y, z)", vector(t.scale, 4, "")]);
    rows.push(["Shear (xy, xz, yz)", vector(t.shear, 4, "")]);
    if (t.reflection) rows.push(["Mirror", "yes: the affine part flips the x axis"]);
  }
  const d = r.deformation;
  if (d) {
    rows.push(["Folding (det J ≤ 0)", `${(100 * d.negative_jacobian_fraction).toFixed(3)}% of voxels`]);
    rows.push(["SD of log det J", fixed(d.sd_log_jacobian, 3)]);
    if (Number.isFinite(d.jacobian_min)) {
      rows.push(["det J range", `${fixed(d.jacobian_min, 2)} to ${fixed(d.jacobian_max, 2)}`]);
    }
  }
  return rows;
}

// Replace a <dl>'s content with rows.
export function fillList(list, rows) {
  list.replaceChildren();
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    list.append(dt, dd);
  }
}

// The verdict in the job list: a short coloured word with the evidence as its title.
export function verdictBadge(cell, job) {
  const r = job.result;
  cell.replaceChildren();
  if (job.state !== "succeeded" || !r) return;
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.dataset.verdict = r.verdict || "none";
  badge.textContent = r.verdict ? VERDICT_WORDS[r.verdict] || r.verdict : "no verdict";
  const detail = document.createElement("span");
  detail.className = "badge-evidence";
  detail.textContent = r.verdict ? evidenceText(r) : "";
  cell.append(badge, detail);
}
