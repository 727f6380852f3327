"""Whether a study row keeps the paper's ordering, judged against the noise in our numbers.

Two cells' errors differ by chance twice over: another seed trains another network, and the
test set is one sample of images. The test is a paired bootstrap of the difference in top-1
error (the other cell's minus the paper's best's): each of ``RESAMPLES`` resamples draws
each cell's seeds with replacement, independently, and the test images with replacement,
the same images for both cells (both were scored on the same test set, so the images'
difficulty cancels out of the difference). Its 95 % percentile interval entirely above zero:
the ordering *holds*; entirely below: it is *reversed*; otherwise *inconclusive*, the runs
cannot tell the two cells apart.

Resampling N images with replacement is drawing N images' correctness patterns (which seeds
of the two cells got the image right) from the patterns' frequencies in the test set: a
multinomial over the few distinct patterns, so 2,000 resamples of 10,000 images take
milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
BLOCK = 250  # resamples drawn at once: bounds the memory with many distinct patterns
HOLDS, REVERSED, INCONCLUSIVE = "holds", "reversed", "inconclusive"
DESCRIPTION = (  # what the reports say the test is
    f"paired bootstrap over seeds and test images: {RESAMPLES} resamples (numpy "
    "default_rng(0)), each drawing every cell's seeds with replacement and the test images "
    "with replacement (the same images for both cells); the verdict from the "
    f"{LEVEL:.0%} percentile interval of the error difference (other column minus first): "
    "above 0 holds, below 0 reversed, else inconclusive"
)


@dataclass(frozen=True)
class Comparison:
    """Top-1 error of the other cell minus the first's (points of %), with its interval."""

    difference: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return HOLDS
        if self.high < 0:
            return REVERSED
        return INCONCLUSIVE


def compare(first: np.ndarray, other: np.ndarray, resamples: int = RESAMPLES) -> Comparison:
    """The paired bootstrap of ``other``'s error minus ``first``'s. Each is a seeds × images
    array of whether that seed's network got that test image right, the images in the same
    order in both; the resamples come from ``numpy.random.default_rng(0)``."""
    rng = np.random.default_rng(0)
    images = first.shape[1]
    patterns, counts = np.unique(np.vstack([first, other]).T, axis=0, return_counts=True)
    blocks = [min(BLOCK, resamples - start) for start in range(0, resamples, BLOCK)]
    drawn = np.concatenate(  # resamples × seeds of both cells: test images right
        [rng.multinomial(images, counts / images, size=n) @ patterns.astype(float) for n in blocks]
    )
    split = len(first)
    differences = _error(drawn[:, split:], images, rng) - _error(drawn[:, :split], images, rng)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(differences, [tail, 100 - tail])
    difference = 100 * (first.mean() - other.mean())
    return Comparison(float(difference), float(low), float(high))


def _error(right: np.ndarray, images: int, rng: np.random.Generator) -> np.ndarray:
    """Per resample (rows of ``right``: each seed's images right), the top-1 error (%) of
    the cell's seeds drawn with replacement."""
    resamples, seeds = right.shape
    drawn = rng.integers(seeds, size=(resamples, seeds))
    return 100 * (1 - np.take_along_axis(right, drawn, axis=1).mean(axis=1) / images)


def row_verdict(verdicts: list[str]) -> str:
    """A row holds if every comparison in it holds, is reversed if any is reversed, and is
    inconclusive otherwise."""
    if REVERSED in verdicts:
        return REVERSED
    return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE
