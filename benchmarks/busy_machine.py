"""Registration time on a busy machine: the engine's thread policy against the defaults.

    python benchmarks/busy_machine.py [--size 96] [--similarity disa|mind] [--repeats 2]

One rigid registration (500 starts + refinement) of a synthetic phantom pair,
each run in a fresh process so the OpenMP runtime reads the policy at start:

    default   DISA_THREAD_POLICY=default: numba's OpenMP and OpenBLAS wait actively
    passive   the engine's policy (registration/threads.py): passive OpenMP
              waiting, one BLAS thread inside register()

measured on an idle machine and with other registrations running beside it
under the same policy, one process per core (a Celery worker with concurrency
equal to the cores, or two workers on one host). Prints the median seconds per
registration by stage and the ratio default / passive.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from common import machine

_CHILD = r"""
import json, sys, time
from disa.training import phantom as ph
from disa.registration.options import RegistrationOptions
from disa.registration.pipeline import register

size, similarity, repeats = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])  # < 0: forever
truth = ph.rigid_truth((20.0, -15.0, 18.0), (30.0, -25.0, 20.0))
grid = ph.make_grid((size, size, size), (2.0, 2.0, 2.0))
pair = ph.make_pair(truth, fixed_grid=grid, seed=12)
options = RegistrationOptions(similarity=similarity, starts=500)
register(pair.fixed, pair.moving, options.model_copy(update={"starts": 10}))  # warm-up
points = ph.grid_points(ph.make_grid((9, 9, 9), (10.0, 10.0, 10.0)))
run = 0
while repeats < 0 or run < repeats:
    run += 1
    t = time.perf_counter()
    result = register(pair.fixed, pair.moving, options)
    total = time.perf_counter() - t
    tre = ph.target_registration_error(result.transform, truth, points)
    print(json.dumps({"total": total, "tre": tre, **result.timings}), flush=True)
"""


def _env(policy: str) -> dict[str, str]:
    env = {**os.environ, "DISA_THREAD_POLICY": policy}
    env.pop("OMP_WAIT_POLICY", None)  # the comparison is of what the engine sets
    return env


@contextmanager
def neighbours(count: int, policy: str, size: int, similarity: str) -> Iterator[None]:
    """``count`` processes registering in a loop under ``policy`` for the block's duration."""
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(size), similarity, "-1"],
                              env=_env(policy), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(count)]
    try:
        time.sleep(5.0)  # past their imports and warm-up: registering when we measure
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def measure(policy: str, size: int, similarity: str, repeats: int) -> list[dict[str, float]]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(size), similarity, str(repeats)],
                         env=_env(policy), check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="phantom side, voxels of 2 mm")
    parser.add_argument("--similarity", default="mind", choices=("disa", "mind"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--load", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="registrations beside the measured one (default: cores - 1)")
    args = parser.parse_args()
    print(f"# Busy-machine registration time ({machine()})")
    print(f"{args.size}^3 phantom at 2 mm, similarity {args.similarity}, 500 starts, "
          f"median of {args.repeats}; busy = {args.load} other registration(s) running\n")
    print("| machine | policy | total s | search L-BFGS s | re-oriented refinement s | "
          "TRE mm |")
    print("|---|---|---|---|---|---|")
    for load in (0, args.load):
        medians: dict[str, float] = {}
        for policy in ("default", "passive"):
            with neighbours(load, policy, args.size, args.similarity):
                runs = measure(policy, args.size, args.similarity, args.repeats)

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r.get(key, 0.0) for r in runs)

            medians[policy] = med("total")
            print(f"| {'idle' if load == 0 else 'busy'} | {policy} | {med('total'):.2f} | "
                  f"{med('search_refine'):.2f} | {med('reorient'):.2f} | {med('tre'):.2f} |")
        print(f"| {'idle' if load == 0 else 'busy'} | ratio default/passive | "
              f"{medians['default'] / medians['passive']:.1f}x | | | |")


if __name__ == "__main__":
    main()
