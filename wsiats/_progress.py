"""The one progress-bar wrapper: commands pass `disable=` instead of branching on verbosity."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

_console = Console(stderr=True)


def track(iterable: Iterable[T], *, total: int | None = None, description: str = "", disable: bool = False,
          label: Callable[[T], str] | None = None, unit: str = "item") -> Iterator[T]:
    """Iterate with a rich progress bar on stderr when it is a terminal.

    Off a terminal (a log file, a batch job), with `label` given, one plain line per item instead, once it is
    done: `<description> 3/20 <label(item)>: 0.52 s/<unit>, ETA 0:00:09`. Nothing when disabled.
    """
    if disable:
        yield from iterable
        return
    if not _console.is_terminal:
        if label is None:
            yield from iterable
            return
        t0 = time.perf_counter()
        for i, item in enumerate(iterable, start=1):
            rate = (time.perf_counter() - t0) / i
            eta = "" if total is None else f", ETA {clock(rate * max(total - i, 0))}"
            _console.print(f"{description} {i}/{total or '?'} {label(item)}: {rate:.3g} s/{unit}{eta}",
                           markup=False, highlight=False, soft_wrap=True)
            yield item
        return
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


def clock(seconds: float) -> str:
    """H:MM:SS of a duration, as rich's TimeRemainingColumn shows it."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
