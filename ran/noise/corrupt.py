"""Noisy labels from clean ones: the transition matrix a kind of noise stands for, and a
seeded draw from it.

A noise kind is a transition matrix Q (``Q[i, j]``: the probability that a record of class
i is labelled j). The paper's symmetric noise is ``Q[i, i] = 1 - r``, ``Q[i, j] = r / (K - 1)``;
pair noise moves class i to one fixed class ``t(i)`` with probability r. Records are drawn
independently from their row of Q, or, with ``exact``, exactly ``round(r * n_i)`` records of
each class i are flipped (and, for symmetric noise, spread as evenly as possible over the
other classes), so that a small data set gets the requested rate, not a sample of it.
"""

from __future__ import annotations

import numpy as np

from ran.config import NoiseParams
from ran.errors import RanError

# CIFAR-10's usual asymmetric noise (Patrini et al., CVPR 2017): visually similar classes.
CIFAR10_PAIRS = {
    "truck": "automobile",
    "bird": "airplane",
    "deer": "horse",
    "cat": "dog",
    "dog": "cat",
}


def pair_targets(classes: list[str], pairs: str) -> np.ndarray:
    """The class each class flips to under pair noise (itself: it never flips)."""
    k = len(classes)
    if pairs == "next":
        return (np.arange(k) + 1) % k
    missing = sorted(({*CIFAR10_PAIRS, *CIFAR10_PAIRS.values()}) - set(classes))
    if missing:
        raise RanError(
            f"pairs cifar10 flips CIFAR-10's classes, and this data has no {', '.join(missing)}; "
            "use pairs next (class c → c + 1)"
        )
    targets = np.arange(k)
    for source, target in CIFAR10_PAIRS.items():
        targets[classes.index(source)] = classes.index(target)
    return targets


def transition_matrix(params: NoiseParams, classes: list[str]) -> np.ndarray:
    """Q for ``params`` over ``classes``: each row a distribution over the noisy label."""
    k, r = len(classes), params.rate
    if params.kind == "none":
        return np.eye(k)
    if params.kind == "symmetric":
        if k < 2:
            raise RanError("symmetric noise needs at least 2 classes")
        q = np.full((k, k), r / (k - 1))
        np.fill_diagonal(q, 1 - r)
        return q
    q = np.eye(k)
    for source, target in enumerate(pair_targets(classes, params.pairs)):
        if target != source:
            q[source, source], q[source, target] = 1 - r, r
    return q


def flippable(params: NoiseParams, classes: list[str]) -> np.ndarray:
    """The classes whose records the rate is measured over: those the noise can move (pair
    noise of ``cifar10`` leaves five alone), and every class for ``none`` (rate 0)."""
    if params.kind == "pair":
        return pair_targets(classes, params.pairs) != np.arange(len(classes))
    return np.ones(len(classes), dtype=bool)


def corrupt(clean: np.ndarray, params: NoiseParams, classes: list[str]) -> np.ndarray:
    """Noisy labels (int64, same order as ``clean``); the same params give the same labels."""
    k = len(classes)
    noisy = np.array(clean, dtype=np.int64)
    if params.kind == "none" or params.rate == 0:
        return noisy
    rng = np.random.default_rng(params.seed)
    moves = flippable(params, classes)
    flip = np.zeros(len(clean), dtype=bool)
    if params.exact:
        for cls in np.flatnonzero(moves):
            members = np.flatnonzero(clean == cls)
            chosen = rng.choice(members, round(params.rate * len(members)), replace=False)
            flip[chosen] = True
    else:
        flip = moves[clean] & (rng.random(len(clean)) < params.rate)
    if params.kind == "pair":
        noisy[flip] = pair_targets(classes, params.pairs)[clean[flip]]
        return noisy
    # symmetric: an offset of 1..K-1 classes, uniform, so never the clean class
    offsets = np.empty(len(clean), dtype=np.int64)
    if params.exact:
        for cls in range(k):
            chosen = np.flatnonzero(flip & (clean == cls))
            even = np.arange(len(chosen)) % (k - 1) + 1  # each other class as often as can be
            offsets[chosen] = rng.permutation(even)
    else:
        offsets[flip] = rng.integers(1, k, size=int(flip.sum()))
    noisy[flip] = (clean[flip] + offsets[flip]) % k
    return noisy
