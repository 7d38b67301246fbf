"""One search feature on and off, same realistic cases, same run: the default method.

    python benchmarks/search_ab.py [--change NAME (CHANGES)] [--pairs a,b,...]
                                   [--cases-per-bin N] [--seed S]
                                   [--family realistic|full] [--out FILE.jsonl]
                                   [--baseline EARLIER.jsonl]

Each case of the realistic capture-range family (``capture_range.make_realistic_cases``;
``--family full``: the full-field one, ``make_cases``, pairs ct-mr and ct-us by default)
runs ``register(fixed, moving)`` twice, back to back: as shipped (arm named after the
change) and with the change undone (arm "off"; CHANGES says what each undoes). One line
per run goes to the jsonl as it finishes (a rerun skips what is there), then a table per
pair: cases converged (TRE < 10 mm) per initial-error bin, TRE p50 of the converged,
median seconds, and the verdict's likely results and how many of them were wrong.

``--baseline``: for a change that no switch undoes (a new scale, a rewritten loop), the
engine as shipped runs alone (arm "shipped") and is tabled beside the shipped arm of an
earlier run of the same cases (same seed, pairs, cases per bin; arm "before"), with the
cases that moved across 10 mm listed. Its seconds come from another run: compare them
only where both ran on one idle machine.
(Until 2026-12-07 this was translation_scan_ab.py, the scan only.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import capture_range as cr
from common import machine, replaced

from disa.registration import pipeline
from disa.registration.search import translation_scan
from disa.registration.search.global_search import SearchSettings


@dataclasses.dataclass(frozen=True)
class _CoarseRankedCut(SearchSettings):
    fine_ranked_cut: bool = False


@dataclasses.dataclass(frozen=True)
class _LongPlacedSteps(SearchSettings):
    placed_step_fraction: float = 1.0


@dataclasses.dataclass(frozen=True)
class _Before20261207(SearchSettings):
    fine_ranked_cut: bool = False
    placed_step_fraction: float = 1.0


def _ranges_after_selection(bins, other, kind, center, count=translation_scan.SCAN_PER_BIN,
                            admissible=None):  # type: ignore[no-untyped-def]
    """The scan as before 2026-12-07: each bin's lowest costs first, the search's ranges
    applied to those afterwards."""
    poses = translation_scan.scan_poses(bins, other, kind, center, count)
    return [pose for pose in poses if admissible is None or admissible(pose[None])[0]]


@contextlib.contextmanager
def _before_20261207() -> Iterator[None]:
    with replaced(pipeline, "SearchSettings", _Before20261207), \
            replaced(pipeline, "MAX_RIVALS", 3), \
            replaced(pipeline, "scan_poses", _ranges_after_selection):
        yield


#: What the "off" arm of each change runs: the engine with that feature undone.
CHANGES: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    # The translation scan per orientation bin (no scanned starts).
    "scan": lambda: replaced(translation_scan, "SCAN_PER_BIN", 0),
    # The last coarse cut ranked on the pooled maps, as before 2026-12-07.
    "fine-cut": lambda: replaced(pipeline, "SearchSettings", _CoarseRankedCut),
    # Three runner-up basins screened on re-oriented maps, as before 2026-12-07.
    "rivals": lambda: replaced(pipeline, "MAX_RIVALS", 3),
    # Scanned poses outside the search's ranges dropped after each bin's lowest were picked.
    "scan-ranges": lambda: replaced(pipeline, "scan_poses", _ranges_after_selection),
    # Placed (scanned) starts taking the random starts' long coarse steps.
    "placed-steps": lambda: replaced(pipeline, "SearchSettings", _LongPlacedSteps),
    # Every search change of 2026-12-07 at once (the four above).
    "search-1207": _before_20261207,
}


def run(pairs: tuple[str, ...], per_bin: int, seed: int, out: Path,
        family: str = "realistic", change: str = "scan", arms: tuple[str, ...] | None = None
        ) -> list[dict]:
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    seen = {(r["case"], r["arm"]) for r in done}
    make = cr.make_realistic_cases if family == "realistic" else cr.make_cases
    cases = make(per_bin, pairs=pairs, seed=seed)
    cr.disa_default(cases[0].fixed, cases[0].moving)  # (one-off costs out of the timings)
    for case in cases:
        for arm in arms or (change, "off"):
            if (case.name, arm) in seen:
                continue
            with CHANGES[change]() if arm == "off" else contextlib.nullcontext():
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
    lines = ["| pair | arm | converged per bin | converged | TRE p50 mm | median s | likely "
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


def earlier(path: Path) -> list[dict]:
    """The shipped arm of an earlier run (any arm but "off"), relabelled "before"."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{**row, "arm": "before"} for row in rows if row["arm"] != "off"]


def moved(rows: list[dict]) -> str:
    """Cases converged (TRE < 10 mm) in one arm of "before"/"shipped" and not the other."""
    by_case: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_case[row["case"]][row["arm"]] = row
    lines = []
    for case, arms in sorted(by_case.items()):
        if {"before", "shipped"} <= arms.keys():
            a, b = arms["before"], arms["shipped"]
            if (a["tre"] < cr.CONVERGED_MM) != (b["tre"] < cr.CONVERGED_MM):
                lines.append(f"- {case}: {a['tre']:.1f} mm ({a['verdict']}) -> "
                             f"{b['tre']:.1f} mm ({b['verdict']})")
    return "\n".join(lines) or "- none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default=None, help="default: ct-mr,t1-t2,ct-us-moving,us-ct,"
                   "ct-mr-torso (realistic) or ct-mr,ct-us (full)")
    p.add_argument("--change", choices=tuple(CHANGES), default="scan")
    p.add_argument("--family", choices=("realistic", "full"), default="realistic")
    p.add_argument("--cases-per-bin", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", type=Path, default=None,
                   help="an earlier run's jsonl of the same cases: run the shipped engine only")
    p.add_argument("--out", type=Path,
                   default=None, help="default: results/search_ab/CHANGE.jsonl")
    args = p.parse_args()
    args.pairs = args.pairs or ("ct-mr,t1-t2,ct-us-moving,us-ct,ct-mr-torso"
                                if args.family == "realistic" else ",".join(cr.PAIRS))
    args.out = args.out or Path(__file__).parent / "results" / "search_ab" / f"{args.change}.jsonl"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arms = ("shipped",) if args.baseline else None
    rows = run(tuple(args.pairs.split(",")), args.cases_per_bin, args.seed, args.out,
               args.family, args.change, arms)
    baseline = f" --baseline {args.baseline}" if args.baseline else f" --change {args.change}"
    report = (f"Command: `python benchmarks/search_ab.py{baseline} "
              f"--family {args.family} "
              f"--pairs {args.pairs} --cases-per-bin {args.cases_per_bin} --seed {args.seed} "
              f"--out {args.out}`. Machine: "
              f"{machine()}.\n\n")
    if args.baseline:
        rows = earlier(args.baseline) + rows
        report += f"Cases that moved across 10 mm:\n\n{moved(rows)}\n\n"
    report += f"{table(rows)}\n"
    print(report)
    args.out.with_suffix(".md").write_text(report)


if __name__ == "__main__":
    main()
