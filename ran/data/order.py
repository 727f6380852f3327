"""The loaders' record order for every stage that walks the train split in epochs (training,
pretraining): seeded, sharded, and resumable part-way through an epoch.

The order is ours, not FFCV's ``RANDOM``: epoch ``e`` is the permutation
``default_rng([seed, e])`` of the records, dealt round-robin to the processes
(``rank::world``, cut to equal lengths so every process takes the same number of steps,
as FFCV's distributed mode does with ``DistributedSampler``), and it can start part-way
through an epoch, which is what an exact resume needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ran.data.beton import import_ffcv


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
