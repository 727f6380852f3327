"""What training reads besides the loader's order (:mod:`ran.data.order`): the held-out
split and the per-record labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ran.errors import RanError


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
