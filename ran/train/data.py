"""What training reads: the seeded, sharded, resumable record order, the held-out split and
the per-record labels.

The loader's order is ours, not FFCV's ``RANDOM``: epoch ``e`` is the permutation
``default_rng([seed, e])`` of the training records, dealt round-robin to the processes
(``rank::world``, cut to equal lengths so every process takes the same number of steps,
as FFCV's distributed mode does with ``DistributedSampler``), and it can start part-way
through an epoch, which is what an exact resume needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ran.data.beton import import_ffcv
from ran.errors import RanError


def seeded_order(seed: int, rank: int = 0, world: int = 1) -> Any:
    """The loader's ``order``: a record order that is a function of (seed, epoch), sharded
    over ``world`` processes, and can start ``skip`` records into an epoch.

    FFCV 1.0.2 accepts a custom order only as an *instance* of ``TraversalOrder`` that it
    then calls with the loader, so this returns such an instance (a factory).
    """
    import_ffcv()
    from ffcv.traversal_order.base import TraversalOrder

    class SeededOrder(TraversalOrder):
        def __init__(self, loader: Any) -> None:
            super().__init__(loader)
            self.skip = 0

        def sample_order(self, epoch: int) -> np.ndarray:
            order = epoch_order(self.indices, seed, epoch, rank, world)
            start, self.skip = self.skip, 0
            return order[start:]

    class Factory(TraversalOrder):
        def __init__(self) -> None:  # no loader yet: FFCV calls the instance with it
            pass

        def __call__(self, loader: Any) -> SeededOrder:
            return SeededOrder(loader)

        def sample_order(self, epoch: int) -> np.ndarray:
            raise NotImplementedError

    return Factory()


def epoch_order(indices: np.ndarray, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """The records process ``rank`` of ``world`` reads in ``epoch``, in order."""
    order = np.random.default_rng([seed, epoch]).permutation(np.asarray(indices))
    per_rank = len(order) // world
    return order[rank::world][:per_rank]


def holdout_split(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` record indices: ``holdout / K`` records of each of the K
    classes, drawn with ``seed``, held out for model selection."""
    classes = int(labels.max()) + 1
    if holdout == 0:
        return np.arange(len(labels)), np.array([], dtype=np.int64)
    per_class, rest = divmod(holdout, classes)
    if rest or per_class == 0:
        raise RanError(
            f"--holdout {holdout} must be a positive multiple of the {classes} classes "
            f"(equal per class), e.g. {classes * max(1, round(holdout / classes))}"
        )
    rng = np.random.default_rng([seed, 1])
    held = []
    for cls in range(classes):
        members = np.flatnonzero(labels == cls)
        if len(members) <= per_class:
            raise RanError(
                f"--holdout {holdout} takes {per_class} records of class {cls}, which has only "
                f"{len(members)}; hold out fewer"
            )
        held.append(rng.choice(members, per_class, replace=False))
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def load_labels(path: Path, count: int, num_classes: int) -> np.ndarray:
    """A noisy-label file: int64, one label per train record, each in [0, num_classes)."""
    if not path.is_file():
        raise RanError(f"labels file {path} does not exist; pass the noise stage's labels.npy")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise RanError(f"labels file {path} is not a .npy array ({exc}); regenerate it") from None
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise RanError(
            f"labels file {path} holds {labels.dtype} of shape {labels.shape}; "
            "expected a 1-D int64 array (one label per train record)"
        )
    if len(labels) != count:
        raise RanError(
            f"labels file {path} has {len(labels)} labels but the train split has {count} "
            "records; it was made for other data: regenerate it from this ingest output"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise RanError(
            f"labels file {path}: label {labels[bad[0]]} at record {bad[0]} is outside "
            f"[0, {num_classes}) ({len(bad)} such); regenerate it from this ingest output"
        )
    return labels
