"""The one progress-bar wrapper: commands pass `disable=` instead of branching on verbosity."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

_console = Console(stderr=True)


def track(iterable: Iterable[T], *, total: int | None = None, description: str = "", disable: bool = False) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr (nothing when disabled or not a terminal)."""
    if disable or not _console.is_terminal:
        yield from iterable
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
