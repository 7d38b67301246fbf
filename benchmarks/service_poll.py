"""Service benchmark: status-poll latency under load and jobs per hour per CPU worker.

Starts a private redis-server, W Celery CPU workers (`disa worker`, concurrency 1
each) and the API (`disa serve`, Celery mode) as subprocesses on this machine,
submits N registrations of the bundled sample pair (T1 template vs synthetic
T2; default engine options unless given), and while the workers are busy runs
C concurrent clients polling GET /v1/jobs/{id}. Prints:

  - poll latency p50 / p90 / p99 / max (target p99 < 100 ms) and requests/s;
  - jobs per hour per CPU worker = N / (first submit -> last finish) x 3600 / W.

    python benchmarks/service_poll.py [--jobs 8] [--workers 1] [--clients 50]
        [--interval 0.25] [--starts 500] [--similarity mind] [--worker-threads N]

Needs redis-server on PATH. Nothing leaves the machine; everything it starts is
stopped at the end (by process id).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Processes:
    """Subprocesses in their own process groups, stopped in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.started):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def _poll_thread(host: str, port: int, job_ids: list[str], offset: int, interval: float,
                 stop, out: list[float], errors: list[int]) -> None:
    """One client: keep-alive http.client (light, so the harness adds little latency)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    i = offset
    while not stop.is_set():
        path = f"/v1/jobs/{job_ids[i % len(job_ids)]}"
        i += 1
        t = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        out.append(time.perf_counter() - t)
        if response.status != 200:
            errors.append(response.status)
        if interval > 0:
            stop.wait(interval)
    conn.close()


def _poll_process(host: str, port: int, job_ids: list[str], first: int, count: int,
                  interval: float, stop, results) -> None:
    """`count` client threads in one process; latencies go back through `results`."""
    out: list[float] = []
    errors: list[int] = []
    threads = [threading.Thread(target=_poll_thread,
                                args=(host, port, job_ids, first + k, interval, stop, out,
                                      errors)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((out, errors))


def _wait_all_finished(url: str, job_ids: list[str]) -> dict[str, float]:
    """Poll (slowly) until every job has ended; return each job's end time (perf_counter)."""
    finished: dict[str, float] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        while len(finished) < len(job_ids):
            for job_id in job_ids:
                if job_id in finished:
                    continue
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    finished[job_id] = time.perf_counter()
                    if job["state"] != "succeeded":
                        print(f"job {job_id} {job['state']}: {job['error']}", file=sys.stderr)
            time.sleep(0.5)
    return finished


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="registrations to run (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="CPU workers (default 1)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent pollers (50)")
    parser.add_argument("--interval", type=float, default=0.25,
                        help="pause between one client's polls, s (default 0.25; 0 = flat out)")
    parser.add_argument("--starts", type=int, default=None, help="engine option (default 500)")
    parser.add_argument("--similarity", default=None, help="engine option (default: engine's)")
    parser.add_argument("--client-processes", type=int, default=5,
                        help="processes the clients are spread over (default 5)")
    parser.add_argument("--worker-threads", type=int, default=None,
                        help="NUMBA_NUM_THREADS of each worker (default: all cores)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")

    from disa.sample import sample_paths

    fixed, moving, _truth = sample_paths()
    options = {k: v for k, v in (("starts", args.starts), ("similarity", args.similarity))
               if v is not None}
    work = Path(tempfile.mkdtemp(prefix="disa-bench-"))
    procs = Processes(work)
    redis_port, api_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{api_port}"
    env = {**os.environ, "DISA_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
           "DISA_JOBS_DIR": str(work / "jobs"), "DISA_API_KEYS": "",
           "DISA_QUEUE": "bench", "DISA_READY_CACHE_S": "1"}
    worker_env = dict(env)
    if args.worker_threads:
        worker_env["NUMBA_NUM_THREADS"] = str(args.worker_threads)
    try:
        procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(work)], env)
        for w in range(args.workers):
            procs.start(f"worker-{w}", [sys.executable, "-m", "disa", "worker", "-c", "1",
                                        "-n", f"bench{w}@%h", "--loglevel", "warning"],
                        worker_env)
        procs.start("api", [sys.executable, "-m", "disa", "serve", "--port", str(api_port),
                            "--log-level", "warning"], env)
        _wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).json()["checks"]["workers"]
                  ["detail"] == f"{args.workers} answering", 90, "API and workers")

        job_ids = []
        t_submit = time.perf_counter()
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(args.jobs):
                with open(fixed, "rb") as f, open(moving, "rb") as m:
                    r = client.post("/v1/jobs", files={"fixed": ("f.nii.gz", f),
                                                       "moving": ("m.nii.gz", m)},
                                    data={"options": json.dumps(options)})
                r.raise_for_status()
                job_ids.append(r.json()["id"])

        # Clients in a few processes (threads each): one Python process cannot
        # drive 50 clients without its own scheduling showing up as latency.
        ctx = multiprocessing.get_context("fork")
        stop, results = ctx.Event(), ctx.Queue()
        n_procs = min(args.clients, max(1, args.client_processes))  # 0 clients: no polling
        shares = [args.clients // n_procs + (k < args.clients % n_procs)
                  for k in range(n_procs)] if n_procs else []
        pollers = [ctx.Process(target=_poll_process,
                               args=("127.0.0.1", api_port, job_ids, sum(shares[:k]), share,
                                     args.interval, stop, results))
                   for k, share in enumerate(shares)]
        t_poll = time.perf_counter()
        for p in pollers:
            p.start()
        finished = _wait_all_finished(url, job_ids)
        stop.set()
        latencies: list[float] = []
        errors: list[int] = []
        for _ in pollers:
            out, errs = results.get(timeout=120)
            latencies += out
            errors += errs
        span = time.perf_counter() - t_poll
        for p in pollers:
            p.join(30)
        elapsed = max(finished.values()) - t_submit
        ms = [x * 1000 for x in latencies]
        per_hour = args.jobs / elapsed * 3600 / args.workers
        print(f"machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, "
              f"Python {platform.python_version()}")
        print(f"jobs: {args.jobs} x sample pair, options {options or 'engine defaults'}, "
              f"{args.workers} CPU worker(s) x concurrency 1, "
              f"numba threads {args.worker_threads or 'all'}")
        if ms:
            print(f"poll latency over {len(ms)} requests from {args.clients} clients "
                  f"({len(ms) / span:.0f} req/s, interval {args.interval} s): "
                  f"p50 {statistics.median(ms):.1f} ms, p90 {_percentile(ms, 0.9):.1f} ms, "
                  f"p99 {_percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms, "
                  f"non-200 {len(errors)}")
        else:
            print("poll latency: not measured (--clients 0)")
        print(f"throughput: {args.jobs} jobs in {elapsed:.1f} s -> "
              f"{per_hour:.0f} jobs/hour per CPU worker")
        return 0
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
