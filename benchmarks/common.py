"""What every benchmark script prints with its figures (imported as ``common`` from
the scripts' own folder, which Python puts on the path when a script runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any


def machine() -> str:
    """Processor, the CPU cores this process may use, and the OS, in one line."""
    cpus = len(os.sched_getaffinity(0))
    return f"{platform.processor() or platform.machine()}, {cpus} CPU cores, {platform.system()}"


def add_case_arguments(p: argparse.ArgumentParser, pairs: Sequence[str],
                       default_bins: Sequence[int], cases_per_bin: int = 1) -> None:
    """--cases-per-bin, --bins and --pairs: which realistic cases a script builds."""
    p.add_argument("--cases-per-bin", type=int, default=cases_per_bin)
    p.add_argument("--bins", default=",".join(map(str, default_bins)),
                   help="initial-error bins (0: 0-25 mm ... 3: 75-100 mm)")
    p.add_argument("--pairs", default=",".join(pairs))


def case_selection(args: argparse.Namespace, quick_crop: int, quick_pair: str = "ct-mr"
                   ) -> tuple[list[str], tuple[int, ...], int | None, int]:
    """(pairs, bins, crop, cases per bin) from the case arguments; --quick: one case of
    `quick_pair` on a `quick_crop`-voxel crop."""
    pairs = [s for s in args.pairs.split(",") if s]
    bins = tuple(int(b) for b in args.bins.split(",") if b)
    if args.quick:
        return [quick_pair], (0,), quick_crop, 1
    return pairs, bins, None, args.cases_per_bin


def case_command(script: str, args: argparse.Namespace, flag: str, value: str) -> list[str]:
    """The words of a script's command line for its report: --quick, or the case arguments
    and `flag` `value` (what the script runs on the cases)."""
    parts = [f"python benchmarks/{script}"]
    if args.quick:
        parts.append("--quick")
    else:
        parts += [f"--cases-per-bin {args.cases_per_bin}", f"--bins {args.bins}",
                  f"--pairs {args.pairs}", f"{flag} {value}"]
    return parts


def report_header(command: str) -> str:
    """The start of a report's first line: the command, the machine and the time (UTC)."""
    return (f"Command: `{command}`. Machine: {machine()}. "
            f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. ")


def write_report(out: Path, name: str, text: str) -> None:
    """Write the report to `out`/`name` (creating the folder) and print it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text, encoding="utf-8")
    print("\n" + text)


def run_pending(cases: Sequence[Any], methods: Sequence[str], done: set[tuple[str, str]],
                run: Callable[[Any, str], Any], sink: IO[str],
                after: Callable[[Any, Any], None]) -> list[Any]:
    """Run every (case, method) not in `done`, in case order; append each outcome (a
    dataclass with `case`, `method`) to `sink` as one JSON line as soon as it exists, so
    that an interrupted benchmark resumes where it stopped, and call `after(case,
    outcome)` (a log line, a table refresh). Returns the new outcomes."""
    outcomes = []
    for case in cases:
        for method in methods:
            if (case.name, method) in done:
                continue
            outcome = run(case, method)
            outcomes.append(outcome)
            sink.write(json.dumps(dataclasses.asdict(outcome)) + "\n")
            sink.flush()
            after(case, outcome)
    return outcomes


def comparison_parser(description: str, pairs: Sequence[str], out: Path,
                      cases_per_bin: int = 1) -> argparse.ArgumentParser:
    """The arguments of a before/after script on realistic cases: --seed, the case
    arguments (bins 0-3), --out and --quick; the script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seed", type=int, default=0)
    add_case_arguments(p, pairs, (0, 1, 2, 3), cases_per_bin=cases_per_bin)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--quick", action="store_true")
    return p


def comparison_cases(args: argparse.Namespace, quick_pair: str, quick_crop: int = 56
                     ) -> tuple[list[str], list[Any]]:
    """(pairs, cases) of ``comparison_parser``'s arguments (``capture_range``'s realistic
    cases; --quick: one case of ``quick_pair`` on a crop), with --out created."""
    import capture_range

    pairs, bins, crop, per_bin = case_selection(args, quick_crop, quick_pair=quick_pair)
    cases = capture_range.make_realistic_cases(per_bin, pairs, args.seed, bins, crop=crop,
                                               log=lambda line: None)
    args.out.mkdir(parents=True, exist_ok=True)
    return pairs, cases


def run_rows(cases: Sequence[Any], runs: Sequence[tuple[str, Callable[[Any], dict[str, Any]]]],
             extra: dict[str, Any], path: Path, describe: Callable[[dict[str, Any]], str]
             ) -> list[dict[str, Any]]:
    """Each case through each named run in one process (a before/after comparison): one
    row per case and run, {case, pair, run, **extra, **what the run returned}, written
    to the jsonl file ``path`` as it comes and printed as ``describe`` words it."""
    rows = []
    with open(path, "w") as log:
        for case in cases:
            for name, run in runs:
                row = {"case": case.name, "pair": case.pair, "run": name, **extra, **run(case)}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"{case.name} {name}: {describe(row)}", flush=True)
    return rows


def within(context: Callable[[], AbstractContextManager[Any]],
           run: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """``run`` inside a fresh ``context()`` each time (a feature switched off)."""
    def wrapped(case: Any) -> dict[str, Any]:
        with context():
            return run(case)
    return wrapped


@contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block and what it was after it (an engine
    feature switched off for a before run, whatever the block raises)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
