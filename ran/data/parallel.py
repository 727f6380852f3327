"""Ordered parallel map over record indices, for the decode pass and the writer.

Tasks are closures over a data set (a split holding 150 MB of CIFAR pixels, say); with the
``fork`` start method the worker processes inherit the task instead of receiving it
pickled, so only indices go out and only results come back, in order — the order is what
keeps every output deterministic.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from ran import lifetime

Result = TypeVar("Result")

_TASK: Callable[[int], object] | None = None  # set in the parent just before the fork


def _call_task(i: int) -> object:
    return _TASK(i)


def ordered_map(
    task: Callable[[int], Result], indices: Sequence[int], workers: int
) -> Iterator[Result]:
    """``task(i)`` for each of ``indices``, in order, computed by ``workers`` processes."""
    global _TASK
    if workers == 1:
        yield from map(task, indices)
        return
    _TASK = task
    lifetime.install()  # the workers die with this process, even on kill -9
    chunksize = max(1, min(256, len(indices) // (workers * 8)))
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_call_task, indices, chunksize=chunksize)
    finally:
        _TASK = None
