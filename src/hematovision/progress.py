"""Progress of long steps: a rich bar on a terminal, a log line every tenth otherwise.

Steps take a ``progress(what, done, total)`` callable. The CLI installs a bar-drawing one; flows
running without a terminal (a Prefect worker, CI) get log lines, so logs stay readable.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Progress = Callable[[str, int, int], None]


def logging_progress(logger: logging.Logger | logging.LoggerAdapter) -> Progress:
    last: dict[str, int] = {}

    def report(what: str, done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if done == total or tenth > last.get(what, -1):
            last[what] = tenth
            logger.info("%s: %d/%d", what, done, total)

    return report


def cli_logger() -> logging.Logger:
    """The logger of CLI commands run without a terminal (CI, a cron job, a DVC stage)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return logging.getLogger("hematovision")


@contextmanager
def console_progress(fallback: Progress | None = None) -> Iterator[Progress | None]:
    """A progress callable drawing one rich bar per step on a terminal; ``fallback`` otherwise."""
    if not sys.stderr.isatty():
        yield fallback
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    bars = RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    tasks: dict[str, int] = {}

    def report(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bars.add_task(what, total=total)
        bars.update(tasks[what], completed=done, total=total)

    with bars:
        yield report


def counting(report: Callable[[int, int], None] | None, total: int, per_item: int = 1) -> Callable[[int], None] | None:
    """Turn increments (the embedding cache reports rows embedded, ``per_item`` rows an image)
    into ``report(items done, total)`` calls; None stays None."""
    if report is None:
        return None
    rows = 0

    def step(n: int) -> None:
        nonlocal rows
        rows += n
        report(rows // per_item, total)

    return step


# The reporter flows use when the CLI started them (a Prefect task runs in a worker thread,
# so a context variable would not reach it).
current: Progress | None = None


def reporter(logger: logging.Logger | logging.LoggerAdapter) -> Progress:
    return current or logging_progress(logger)
