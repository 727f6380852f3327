"""The one progress bar of every long step (decoding, writing betons, training, the prior's
maps, predicting files): rich's bar on stderr, since stdout carries a command's answer.

Where stderr is not a terminal (DVC, CI logs, a file) nothing is redrawn: each task prints
one line when its step ends, its final state (done/total, fields, elapsed time), 140 columns
wide so that the fields can be read in the log. MLflow's own per-file artifact bars are
turned off there too (:func:`quiet_in_logs`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Item = TypeVar("Item")
LOG_WIDTH = 140  # columns of a bar written to a log rather than a terminal


class Bar(Progress):
    """rich's Progress; disabled outside a terminal, where it prints one line per task
    when it stops (a transient bar, which a terminal would erase, prints nothing)."""

    def stop(self) -> None:
        super().stop()
        shown = self.disable and self.tasks and not self.live.transient
        if shown and not getattr(self, "_reported", False):
            self._reported = True
            self.console.print(self.make_tasks_table(self.tasks))


def progress_bar(fields: str = "", transient: bool = False) -> Bar:
    """A bar with description, bar, done/total, ``fields`` (a format string over
    ``task.fields``, e.g. ``"loss {task.fields[loss]:.3f}"``), elapsed time and ETA.
    ``transient``: the bar disappears when done."""
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *([TextColumn(fields)] if fields else []),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    terminal = sys.stderr.isatty()
    console = Console(stderr=True, width=None if terminal else LOG_WIDTH)
    # Not refreshed by a thread in a log: rich's tracking thread stops at once when nothing is
    # drawn, and its count with it; without it, ``track`` counts each item itself.
    return Bar(
        *columns,
        console=console,
        transient=transient,
        disable=not terminal,
        auto_refresh=terminal,
    )


def quiet_in_logs() -> None:
    """Outside a terminal, MLflow's per-file "Downloading artifacts" bars say nothing (a
    user's own MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracked(description: str, total: int) -> Callable[[Iterable[Item]], Iterator[Item]]:
    """A function that walks an iterable of ``total`` items under its own bar."""

    def walk(items: Iterable[Item]) -> Iterator[Item]:
        with progress_bar() as bar:
            yield from bar.track(items, total=total, description=description)

    return walk
