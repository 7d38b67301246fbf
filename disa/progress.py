"""Progress display for the CLI: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from disa.registration.search.global_search import Progress


@contextmanager
def progress_reporter(stream: TextIO | None = None, quiet: bool = False) -> Iterator[Progress]:
    """Yield a progress(stage, fraction) callback suited to ``stream`` (default stderr)."""
    stream = stream or sys.stderr
    if quiet:
        yield lambda stage, fraction: None
        return
    if stream.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description:<12}"), BarColumn(),
                      TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                      console=Console(file=stream), transient=False) as bar:
            task = bar.add_task("start", total=1.0)

            def report(stage: str, fraction: float) -> None:
                bar.update(task, description=stage, completed=max(0.0, min(1.0, fraction)))

            yield report
        return
    start = time.perf_counter()
    last: list[str] = [""]

    def plain(stage: str, fraction: float) -> None:
        # One line per stage change or per 25 %: log files stay short and greppable.
        key = f"{stage}:{int(fraction * 4)}"
        if key != last[0]:
            last[0] = key
            print(f"[{time.perf_counter() - start:7.2f} s] {stage} {fraction:4.0%}", file=stream,
                  flush=True)

    yield plain
