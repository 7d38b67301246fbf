"""The translation scan on and off, same realistic cases, same run: the default method.

    python benchmarks/translation_scan_ab.py [--pairs a,b,...] [--cases-per-bin N]
                                             [--seed S] [--family realistic|full]
                                             [--out FILE.jsonl]

Each case of the realistic capture-range family (``capture_range.make_realistic_cases``;
``--family full``: the full-field one, ``make_cases``, pairs ct-mr and ct-us by default)
runs ``register(fixed, moving)`` twice, back to back: with the scan
(``translation_scan.SCAN_PER_BIN`` as shipped) and without it (0). One line per run goes
to the jsonl as it finishes (a rerun skips what is there), then a table per pair: cases
converged (TRE < 10 mm) per initial-error bin, TRE p50 of the converged, median seconds,
and the verdict's likely results and how many of them were wrong.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import capture_range as cr
from common import machine, replaced

from disa.registration.search import translation_scan

ARMS = ("scan", "off")


def run(pairs: tuple[str, ...], per_bin: int, seed: int, out: Path,
        family: str = "realistic") -> list[dict]:
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    seen = {(r["case"], r["arm"]) for r in done}
    make = cr.make_realistic_cases if family == "realistic" else cr.make_cases
    cases = make(per_bin, pairs=pairs, seed=seed)
    cr.disa_default(cases[0].fixed, cases[0].moving)  # (one-off costs out of the timings)
    shipped = translation_scan.SCAN_PER_BIN
    for case in cases:
        for arm in ARMS:
            if (case.name, arm) in seen:
                continue
            with replaced(translation_scan, "SCAN_PER_BIN", shipped if arm == "scan" else 0):
                start = time.perf_counter()
                transform, _, _, reported = cr.disa_default(case.fixed, case.moving)
                seconds = time.perf_counter() - start
            row = {"case": case.name, "pair": case.pair, "bin": case.bin_index, "arm": arm,
                   "tre": cr.tre(transform, case.truth, case.points), "s": seconds,
                   "verdict": reported.get("verdict")}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    return done


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["pair"], row["arm"])].append(row)
    lines = ["| pair | scan | converged per bin | converged | TRE p50 mm | median s | likely "
             "(wrong) |", "|---|---|---|---:|---:|---:|---:|"]
    for (pair, arm), group in sorted(groups.items()):
        ok = [r for r in group if r["tre"] < cr.CONVERGED_MM]
        per_bin = "/".join(str(sum(r["bin"] == b for r in ok)) for b in range(4))
        likely = [r for r in group if r["verdict"] == "likely"]
        wrong = sum(r["tre"] >= cr.CONVERGED_MM for r in likely)
        p50 = f"{statistics.median(r['tre'] for r in ok):.2f}" if ok else "-"
        lines.append(f"| {pair} | {arm} | {per_bin} | {len(ok)} / {len(group)} | {p50} | "
                     f"{statistics.median(r['s'] for r in group):.2f} | {len(likely)} "
                     f"({wrong}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default=None, help="default: ct-mr,t1-t2,ct-us-moving,us-ct,"
                   "ct-mr-torso (realistic) or ct-mr,ct-us (full)")
    p.add_argument("--family", choices=("realistic", "full"), default="realistic")
    p.add_argument("--cases-per-bin", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results" / "translation_scan" / "ab.jsonl")
    args = p.parse_args()
    args.pairs = args.pairs or ("ct-mr,t1-t2,ct-us-moving,us-ct,ct-mr-torso"
                                if args.family == "realistic" else ",".join(cr.PAIRS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = run(tuple(args.pairs.split(",")), args.cases_per_bin, args.seed, args.out,
               args.family)
    report = (f"Command: `python benchmarks/translation_scan_ab.py --family {args.family} "
              f"--pairs {args.pairs} --cases-per-bin {args.cases_per_bin} --seed {args.seed} "
              f"--out {args.out}`. Machine: "
              f"{machine()}.\n\n{table(rows)}\n")
    print(report)
    args.out.with_suffix(".md").write_text(report)


if __name__ == "__main__":
    main()
