"""Where the network looked: each attention module's mask blended over the image.

The mask of a module is its soft mask M(x) averaged over channels (``Predictor.masks``),
min–max scaled, coloured with viridis and blended at half strength over the square the
network saw (the central crop, at its own resolution; at least ``MIN_SIDE`` px so a 32 px
CIFAR image stays readable). One PNG per module, and one strip: the image, then every
module, side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ran.inference.images import central_square, crop_ratio

MIN_SIDE = 128
ALPHA = 0.5


def _upsampled(array: np.ndarray, side: int, smooth: bool) -> np.ndarray:
    import cv2

    interpolation = cv2.INTER_LINEAR if smooth else cv2.INTER_NEAREST
    return cv2.resize(array, (side, side), interpolation=interpolation)


def shown_square(image: np.ndarray, small_images: bool) -> np.ndarray:
    """The square the network saw, at its own resolution (at least ``MIN_SIDE`` px)."""
    square = central_square(image, crop_ratio(small_images))
    return _upsampled(square, max(square.shape[0], MIN_SIDE), smooth=False)


def blend(shown: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A mask (h×w float) upsampled, scaled, coloured and blended over ``shown``."""
    import matplotlib

    scaled = _upsampled(mask.astype(np.float32), shown.shape[0], smooth=True)
    scaled = (scaled - scaled.min()) / max(float(scaled.max() - scaled.min()), 1e-8)
    colour = matplotlib.colormaps["viridis"](scaled)[:, :, :3] * 255
    return ((1 - ALPHA) * shown + ALPHA * colour).round().astype(np.uint8)


def write_overlays(
    image: np.ndarray, masks: list[np.ndarray], small_images: bool, folder: Path, stem: str
) -> list[Path]:
    """``folder/STEM.module-N.png`` for each module and ``folder/STEM.strip.png``."""
    from PIL import Image

    shown = shown_square(image, small_images)
    blended = [blend(shown, mask) for mask in masks]
    paths = []
    for n, picture in enumerate(blended, start=1):
        paths.append(folder / f"{stem}.module-{n}.png")
        Image.fromarray(picture).save(paths[-1])
    gap = np.full((shown.shape[0], 4, 3), 255, dtype=np.uint8)
    strip = [shown]
    for picture in blended:
        strip += [gap, picture]
    paths.append(folder / f"{stem}.strip.png")
    Image.fromarray(np.concatenate(strip, axis=1)).save(paths[-1])
    return paths
