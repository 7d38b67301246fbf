// The DISA web page: API key, upload form, job list with live progress, result page.
// Plain ES modules, no framework; every request goes to the same origin's /v1 API.

import * as api from "./api.js";
import { overallFraction, remainingText, stageWords } from "./progress.js";
import {
  evidenceText, fillList, showVerdict, summaryRows, transformRows, verdictBadge,
} from "./result.js";
import { Viewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const JOB_ID = /^[0-9a-f]{32}$/;
const FILE_ROLES = ["fixed", "moving", "fixed_mask", "moving_mask", "initial_transform"];
const NUMBER_OPTIONS = [
  ["opt-starts", "starts", true],
  ["opt-seed", "seed", true],
  ["opt-rotation", "rotation_range", false],
  ["opt-translation", "translation_range", false],
];
const LIST_ACTIVE_MS = 1500;
const LIST_IDLE_MS = 10000;
const JOB_POLL_MS = 700;

const short = (id) => id.slice(0, 8);
const percent = (f) => `${Math.round(100 * f)}%`;
const lastSeen = new Map(); // job id -> "state/stage" last announced
let listTimer = null;
let listFailed = false; // jobs-status shows a failed list refresh (cleared by the next good one)
let current = null; // the job shown on the result page: {id, timer, viewer, shown}

function announce(text) {
  $("announcer").textContent = text;
}

function progressText(job) {
  if (job.state === "running") return `${stageWords(job)}, ${percent(overallFraction(job))}`;
  return stageWords(job);
}

// Tell screen readers about state and stage changes (not every percent).
function noteJob(job) {
  const key = `${job.state}/${job.state === "running" ? job.progress.stage : ""}`;
  const before = lastSeen.get(job.id);
  lastSeen.set(job.id, key);
  if (before === key) return;
  if (before === undefined && !(current && current.id === job.id)) return;
  let text = `Job ${short(job.id)}: ${job.state}`;
  if (job.state === "running") text += `, ${stageWords(job)}`;
  if (job.state === "succeeded" && job.result) {
    if (job.result.verdict) text += `, verdict ${job.result.verdict}: ${evidenceText(job.result)}`;
  }
  if (job.state === "failed" && job.error) text += `: ${job.error}`;
  announce(`${text}.`);
}

// ------------------------------------------------------------------ API key

function initKey() {
  $("api-key").value = api.getKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    api.setKey($("api-key").value.trim());
    $("key-status").textContent = api.getKey() ? "Key set for this tab." : "No key set.";
    refreshJobs();
  });
  $("key-forget").addEventListener("click", () => {
    api.setKey("");
    $("api-key").value = "";
    $("key-status").textContent = "Key forgotten.";
  });
}

// ------------------------------------------------------------------- upload

function uploadOptions() {
  const options = { mode: $("opt-mode").value };
  if ($("opt-similarity").value) options.similarity = $("opt-similarity").value;
  for (const [id, name, integer] of NUMBER_OPTIONS) {
    const text = $(id).value.trim();
    if (text !== "") options[name] = integer ? Number.parseInt(text, 10) : Number.parseFloat(text);
  }
  return options;
}

// The browser refused the form (its own check, before any submit event): say why in the
// status line too, replacing an earlier refusal, not only in the browser's passing bubble.
function onInvalid() {
  const invalid = [...$("upload-form").elements].find((el) => el.willValidate && !el.validity.valid);
  if (!invalid) return;
  const status = $("upload-status");
  status.classList.add("error");
  status.textContent = `Not submitted: ${invalid.labels[0].textContent.trim()}: `
    + invalid.validationMessage;
}

async function onSubmit(event) {
  event.preventDefault();
  const form = $("upload-form");
  const status = $("upload-status");
  if (!form.reportValidity()) return;  // onInvalid says why
  const data = new FormData();
  for (const role of FILE_ROLES) {
    const file = $(role).files[0];
    if (file) data.append(role, file, file.name);
  }
  for (const name of ["fixed_series_uid", "moving_series_uid"]) {
    const uid = $(name).value.trim();
    if (uid) data.append(name, uid);
  }
  data.append("options", JSON.stringify(uploadOptions()));
  const button = $("submit");
  const bar = $("upload-progress");
  button.disabled = true;
  bar.hidden = false;
  bar.value = 0;
  status.classList.remove("error");
  status.textContent = "Uploading…";
  try {
    const job = await api.submitJob(data, (fraction) => { bar.value = fraction; });
    status.textContent = `Job ${short(job.id)} queued.`;
    for (const role of FILE_ROLES) $(role).value = "";
    await refreshJobs();
    navigate(`/jobs/${job.id}`);
  } catch (err) {
    status.classList.add("error");
    status.textContent = `Not submitted: ${api.describeError(err)}`;
  } finally {
    button.disabled = false;
    bar.hidden = true;
  }
}

// ----------------------------------------------------------------- job list

function makeRow(job) {
  const row = document.createElement("tr");
  row.dataset.id = job.id;
  row.innerHTML = `
    <th scope="row"><a class="job-link" href="/jobs/${job.id}"></a></th>
    <td class="created"></td>
    <td class="state"></td>
    <td class="verdict-cell"></td>
    <td class="progress"><progress max="1" value="0"></progress> <span class="stage"></span></td>
    <td><button type="button" class="job-action"></button></td>`;
  const link = row.querySelector(".job-link");
  link.textContent = short(job.id);
  link.setAttribute("aria-label", `Job ${short(job.id)}: open result`);
  row.querySelector("progress").setAttribute("aria-label", `Progress of job ${short(job.id)}`);
  row.querySelector(".job-action").addEventListener("click", () => onJobAction(row));
  link.addEventListener("click", (event) => {
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) return;
    event.preventDefault();
    navigate(`/jobs/${job.id}`);
  });
  return row;
}

function updateRow(row, job) {
  row.dataset.state = job.state;
  row.querySelector(".created").textContent = new Date(job.created_at).toLocaleString();
  row.querySelector(".state").textContent = job.state;
  const bar = row.querySelector("progress");
  bar.value = overallFraction(job);
  row.querySelector(".stage").textContent = progressText(job);
  verdictBadge(row.querySelector(".verdict-cell"), job);
  const action = row.querySelector(".job-action");
  const finished = TERMINAL.has(job.state);
  action.textContent = finished ? "Delete" : "Cancel";
  action.setAttribute("aria-label", `${finished ? "Delete" : "Cancel"} job ${short(job.id)}`);
}

function renderJobs(jobs) {
  const body = $("jobs-body");
  const rows = new Map([...body.rows].map((row) => [row.dataset.id, row]));
  jobs.forEach((job, i) => {
    const row = rows.get(job.id) || makeRow(job);
    rows.delete(job.id);
    updateRow(row, job);
    if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
    noteJob(job);
  });
  for (const row of rows.values()) row.remove();
  $("jobs-empty").hidden = jobs.length > 0;
}

async function refreshJobs() {
  clearTimeout(listTimer);
  let active = false;
  try {
    const page = await api.getJson("/v1/jobs?limit=50");
    renderJobs(page.items);
    active = page.items.some((job) => !TERMINAL.has(job.state));
    $("jobs-note").textContent = page.total > page.items.length
      ? `Showing the newest ${page.items.length} of ${page.total} jobs.` : "";
    // Only our own error is cleared: a cancel or delete message (or refusal) stays.
    if (listFailed) $("jobs-status").textContent = "";
    listFailed = false;
  } catch (err) {
    $("jobs-status").textContent = `Job list: ${api.describeError(err)}`;
    listFailed = true;
  }
  listTimer = setTimeout(refreshJobs, active ? LIST_ACTIVE_MS : LIST_IDLE_MS);
}

async function onJobAction(row) {
  const id = row.dataset.id;
  const finished = TERMINAL.has(row.dataset.state);
  if (finished && !window.confirm(`Delete job ${short(id)} and its files?`)) return;
  listFailed = false;
  try {
    if (finished) await api.remove(api.jobPath(id));
    else await api.cancel(api.jobPath(id));
    $("jobs-status").textContent = `Job ${short(id)} ${finished ? "deleted" : "cancel requested"}.`;
    if (finished && current && current.id === id) navigate("/");
  } catch (err) {
    $("jobs-status").textContent = `Job ${short(id)} not ${finished ? "deleted" : "cancelled"}: `
      + api.describeError(err);
  }
  refreshJobs();
}

// --------------------------------------------------------------- result page

function closeJob() {
  if (!current) return;
  clearTimeout(current.timer);
  if (current.viewer) current.viewer.destroy();
  if (current.qaUrl) URL.revokeObjectURL(current.qaUrl);
  current = null;
  $("result").hidden = true;
  delete document.body.dataset.view;
}

function openJob(id) {
  if (current && current.id === id) return;
  closeJob();
  current = { id, timer: null, viewer: null, shown: false, qaUrl: null };
  const section = $("result");
  section.hidden = false;
  section.dataset.job = id;
  delete section.dataset.state;
  document.body.dataset.view = "result";
  $("result-link").href = `/jobs/${id}`;
  $("result-eta").textContent = "";
  $("result-bar").value = 0;
  $("result-stage").textContent = "";
  window.scrollTo(0, 0);
  $("result-heading").textContent = `Job ${short(id)}`;
  $("result-heading").title = id;
  $("result-body").hidden = true;
  $("result-error").hidden = true;
  $("result-state").textContent = "";
  $("result-heading").focus();
  pollJob();
}

async function pollJob() {
  const shown = current;
  if (!shown) return;
  try {
    const job = await api.getJson(api.jobPath(shown.id));
    if (current !== shown) return;
    showJob(job);
    if (!TERMINAL.has(job.state)) shown.timer = setTimeout(pollJob, JOB_POLL_MS);
  } catch (err) {
    if (current !== shown) return;
    $("result-error").hidden = false;
    $("result-error").textContent = api.describeError(err);
    if (err.status !== 404) shown.timer = setTimeout(pollJob, 3000);
  }
}

function showJob(job) {
  noteJob(job);
  const section = $("result");
  section.dataset.state = job.state;
  $("result-state").textContent = job.state;
  $("result-bar").value = overallFraction(job);
  $("result-stage").textContent = stageWords(job);
  $("result-eta").textContent = remainingText(job);
  const error = $("result-error");
  error.hidden = !job.error;
  error.textContent = job.error ? `The job failed: ${job.error}` : "";
  if (job.state === "succeeded" && !current.shown) {
    current.shown = true;
    showResult(job);
  }
}

function rawParameterRows(r) {
  return (r.parameter_names || []).map((name, i) => {
    const value = r.parameters[i];
    const text = name.endsWith("_rad")
      ? `${((value * 180) / Math.PI).toFixed(3)}° (${value.toFixed(5)} rad)`
      : name.endsWith("_mm") ? `${value.toFixed(3)} mm` : value.toFixed(5);
    return [name, text];
  });
}

async function showResult(job) {
  const shown = current;
  const r = job.result || {};
  showVerdict($("verdict"), r);
  fillList($("result-summary"), summaryRows(job));
  fillList($("transform-summary"), transformRows(r));
  fillList($("raw-parameters"), rawParameterRows(r));
  const list = $("downloads");
  list.replaceChildren();
  for (const name of job.files) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `Download ${name}`;
    button.dataset.file = name;
    button.addEventListener("click", () => download(job.id, name));
    item.append(button);
    list.append(item);
  }
  $("result-body").hidden = false;
  if (job.files.includes("qa.png")) {
    api.getBlob(api.jobPath(job.id, "/files/qa.png")).then((blob) => {
      if (current !== shown) return;
      shown.qaUrl = URL.createObjectURL(blob);
      $("qa").src = shown.qaUrl;
    }).catch(() => { $("qa").alt = "The QA picture could not be loaded."; });
  }
  shown.viewer = new Viewer(job.id, $("result"), job);
  try {
    await shown.viewer.open();
  } catch (err) {
    if (current !== shown) return;
    $("viewer-status").textContent = `Viewer: ${api.describeError(err)}`;
  }
}

async function download(id, name) {
  const status = $("viewer-status");
  try {
    const blob = await api.getBlob(api.jobPath(id, `/files/${encodeURIComponent(name)}`));
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    status.textContent = `Download of ${name}: ${api.describeError(err)}`;
  }
}

// ------------------------------------------------------------------- routing

// The job a location names: /jobs/{id} (the result view's own address) or, from older
// links, #job={id}.
function jobInLocation() {
  const path = /^\/jobs\/([0-9a-f]{32})\/?$/.exec(location.pathname);
  if (path) return path[1];
  const hash = /^#job=([0-9a-f]{32})$/.exec(location.hash);
  return hash && JOB_ID.test(hash[1]) ? hash[1] : null;
}

function navigate(path) {
  if (location.pathname + location.hash !== path) history.pushState(null, "", path);
  route();
}

function route() {
  const id = jobInLocation();
  if (id) openJob(id);
  else if (current) {
    closeJob();
    $("jobs-heading").focus();
  }
}

function init() {
  initKey();
  $("upload-form").addEventListener("submit", onSubmit);
  $("upload-form").addEventListener("invalid", onInvalid, true);  // "invalid" does not bubble
  $("jobs-refresh").addEventListener("click", () => refreshJobs());
  $("result-back").addEventListener("click", (event) => {
    event.preventDefault();
    navigate("/");
  });
  $("jobs-heading").tabIndex = -1;
  window.addEventListener("hashchange", route);
  window.addEventListener("popstate", route);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshJobs();
  });
  refreshJobs();
  route();
  document.body.dataset.ready = "1";
}

init();
