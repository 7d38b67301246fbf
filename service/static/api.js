// The /v1 API as the page uses it: the API key from sessionStorage in X-API-Key,
// errors as ApiError carrying the server's one-line `detail`.

const KEY_NAME = "disa.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

function headers() {
  const key = getKey();
  return key ? { "X-API-Key": key } : {};
}

async function errorOf(response) {
  let detail = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && typeof body.detail === "string") detail = body.detail;
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, detail);
}

export async function request(path, { method = "GET" } = {}) {
  let response;
  try {
    response = await fetch(path, { method, headers: headers() });
  } catch (err) {
    throw new ApiError(0, `the service did not answer (${err.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(path) {
  return (await request(path)).json();
}

export async function getBytes(path) {
  return new Uint8Array(await (await request(path)).arrayBuffer());
}

export async function getBlob(path) {
  return (await request(path)).blob();
}

// DELETE a finished job (409 while it is queued or running).
export async function remove(path) {
  await request(path, { method: "DELETE" });
}

// POST .../cancel: cancel a queued or running job; resolves to the job JSON.
export async function cancel(path) {
  return (await request(`${path}/cancel`, { method: "POST" })).json();
}

export function jobPath(id, rest = "") {
  return `/v1/jobs/${encodeURIComponent(id)}${rest}`;
}

// POST /v1/jobs with upload progress (fetch has none): resolves to the job JSON.
export function submitJob(formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/jobs");
    for (const [name, value] of Object.entries(headers())) xhr.setRequestHeader(name, value);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status === 202) resolve(xhr.response);
      else {
        const detail = xhr.response && typeof xhr.response.detail === "string"
          ? xhr.response.detail : `HTTP ${xhr.status}`;
        reject(new ApiError(xhr.status, detail));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "the upload failed (network)")));
    xhr.send(formData);
  });
}

// A message for the user: what went wrong and, for key problems, what to do.
export function describeError(err) {
  if (!(err instanceof ApiError)) return `unexpected error: ${err.message || err}`;
  if (err.status === 401) return "The service needs an API key: enter it in the API key box.";
  if (err.status === 403) return "The API key was not accepted: check it and enter it again.";
  return err.detail;
}
