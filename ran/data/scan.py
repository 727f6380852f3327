"""The decode pass: every source image read once, in parallel, before anything is written.

Scanning first buys three things: an unreadable file fails the stage (naming the file)
before a long write starts, the per-record manifest (size, content hash) and the train
split's per-channel statistics come for free, and FFCV's writer, which hangs when a worker
raises, only ever sees images already known to decode.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property, partial

import numpy as np

from ran.data.parallel import ordered_map
from ran.data.sources import Split


@dataclass
class ScanResult:
    """Per-record facts of one split, in source order; ``bad`` names what failed to decode."""

    height: np.ndarray  # 0 for bad records, so maxima need no filtering
    width: np.ndarray
    content_hash: list[str]
    channel_sum: np.ndarray  # float64 [3], over every pixel of the good records
    channel_sq_sum: np.ndarray
    bad: list[tuple[int, str]]  # (index, "path: reason")

    @cached_property
    def good(self) -> np.ndarray:
        """Indices of the records that decoded (read by every later step, computed once)."""
        keep = np.ones(len(self.height), dtype=bool)
        keep[[i for i, _ in self.bad]] = False
        return np.flatnonzero(keep)

    @property
    def max_side(self) -> int:
        """The longest image side in the split (0 when nothing decoded)."""
        return int(max(self.height.max(initial=0), self.width.max(initial=0)))

    @property
    def max_pixels(self) -> int:
        return int((self.height * self.width).max(initial=0))

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std on the 0–255 scale, over all pixels of the good records."""
        keep = self.good
        pixels = float((self.height[keep].astype(np.float64) * self.width[keep]).sum())
        mean = self.channel_sum / pixels
        std = np.sqrt(np.maximum(self.channel_sq_sum / pixels - mean**2, 0.0))
        return mean.tolist(), std.tolist()


def content_hash(image: np.ndarray) -> str:
    """A digest of the exact pixels (and shape): equal hashes mean identical images."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(image.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _facts(split: Split, prepare: Callable[[np.ndarray], np.ndarray], i: int) -> tuple | str:
    """Size, hash and channel sums of record ``i``, or ``"name: reason"`` if it won't decode."""
    try:
        image = prepare(split.load(i))
    except Exception as exc:  # any decoder failure is a bad image, reported by name
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{split.name(i)}: {reason}"
    flat = image.reshape(-1, 3).astype(np.float64)
    return image.shape[0], image.shape[1], content_hash(image), flat.sum(0), (flat**2).sum(0)


def scan_split(
    split: Split,
    prepare: Callable[[np.ndarray], np.ndarray],
    workers: int,
    progress: Callable[[Iterable], Iterable] = iter,
) -> ScanResult:
    """Decode every image of ``split`` through ``prepare`` (RGB → stored form) and record facts."""
    n = len(split)
    height = np.zeros(n, dtype=np.int64)
    width = np.zeros(n, dtype=np.int64)
    hashes = [""] * n
    total, total_sq = np.zeros(3), np.zeros(3)
    bad: list[tuple[int, str]] = []
    facts = ordered_map(partial(_facts, split, prepare), range(n), workers)
    for i, result in enumerate(progress(facts)):
        if isinstance(result, str):
            bad.append((i, result))
            continue
        height[i], width[i], hashes[i], s, sq = result
        total += s
        total_sq += sq
    return ScanResult(height, width, hashes, total, total_sq, bad)
