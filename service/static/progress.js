// One overall progress figure for a job: the engine's stages in plain language, each a
// share of the whole run, so the bar only moves forward, and a time estimate.
//
// The engine reports (stage, fraction of that stage); its stages come in this order, some
// only in some modes. A stage's share is a rough part of a typical run's time.

const STAGES = [
  ["read", 0.04, "Reading the images"],
  ["preprocess", 0.06, "Preparing the images"],
  ["descriptors", 0.1, "Describing the images' structure"],
  ["search", 0.35, "Searching for the best alignment"],
  ["refine", 0.15, "Checking the best candidates"],
  ["reorient", 0.1, "Fine-tuning the alignment"],
  ["affine", 0.06, "Fitting scale and shear"],
  ["deformable", 0.04, "Fitting local deformations"],
  ["field", 0.05, "Fitting local deformations"],
  ["write", 0.05, "Writing the results and the QA picture"],
];
const TOTAL = STAGES.reduce((sum, [, share]) => sum + share, 0);

// Plain-language words for a job's state and stage.
export function stageWords(job) {
  if (job.state === "queued") return "Waiting for a worker";
  if (job.state === "succeeded") return "Done";
  if (job.state === "failed") return "Failed";
  if (job.state === "cancelled") return "Cancelled";
  const stage = job.progress && job.progress.stage;
  const known = STAGES.find(([name]) => name === stage);
  if (known) return known[2];
  return stage === "done" ? "Finishing" : "Starting";
}

// Overall fraction 0..1 of the whole job (never the stage's own fraction).
export function overallFraction(job) {
  if (job.state === "succeeded") return 1;
  if (job.state !== "running") return 0;
  const stage = job.progress && job.progress.stage;
  const fraction = Math.min(1, Math.max(0, Number(job.progress && job.progress.fraction) || 0));
  if (stage === "done") return 1;
  let before = 0;
  for (const [name, share] of STAGES) {
    if (name === stage) return Math.min(0.99, (before + share * fraction) / TOTAL);
    before += share;
  }
  return 0.02;
}

// "about 12 s left" from the time running so far and the overall fraction; "" when the
// job is not running. The time so far is the service's own (updated_at - started_at, both
// its clock), so a browser clock that is off does not skew the estimate.
export function remainingText(job, now = Date.now()) {
  if (job.state !== "running" || !job.started_at) return "";
  const fraction = overallFraction(job);
  const until = job.updated_at ? Date.parse(job.updated_at) : now;
  const elapsed = (until - Date.parse(job.started_at)) / 1000;
  if (!(fraction >= 0.1) || !(elapsed > 1)) return "estimating the time left…";
  const left = Math.max(1, Math.round(elapsed * (1 - fraction) / fraction));
  return left < 90 ? `about ${left} s left` : `about ${Math.round(left / 60)} min left`;
}
