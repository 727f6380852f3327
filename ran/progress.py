"""The one progress bar of every long step (decoding, writing betons, training, the prior's
maps, predicting files): rich's bar on stderr, since stdout carries a command's answer.

Where stderr is not a terminal (DVC, CI logs) the bar is drawn 140 columns wide so that its
fields can be read in the log.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

Item = TypeVar("Item")
LOG_WIDTH = 140  # columns of a bar written to a log rather than a terminal


def progress_bar(fields: str = "", transient: bool = False) -> Any:
    """A ``rich.progress.Progress``: description, bar, done/total, ``fields`` (a format
    string over ``task.fields``, e.g. ``"loss {task.fields[loss]:.3f}"``), elapsed time and
    ETA. ``transient``: the bar disappears when done."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *([TextColumn(fields)] if fields else []),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    console = Console(stderr=True, width=None if sys.stderr.isatty() else LOG_WIDTH)
    return Progress(*columns, console=console, transient=transient)


def tracked(description: str, total: int) -> Callable[[Iterable[Item]], Iterator[Item]]:
    """A function that walks an iterable of ``total`` items under its own bar."""

    def walk(items: Iterable[Item]) -> Iterator[Item]:
        with progress_bar() as bar:
            yield from bar.track(items, total=total, description=description)

    return walk
