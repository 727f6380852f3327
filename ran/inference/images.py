"""A user's image as the network sees it.

Reading matches ingestion (:func:`ran.data.sources.to_rgb`), plus the EXIF rotation a
camera records. Cutting matches evaluation's FFCV decoders: CIFAR-size networks see the
central square resized to their side (a 32 px CIFAR image unchanged, as FFCV's simple
decoder gives it); ImageNet-size ones the central square of 224/256 of the short side,
resized with OpenCV's area interpolation, as FFCV's centre-crop decoder does. So a test
image predicted from its file gets the probabilities evaluation computed for its record.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ran.data.beton import IMAGENET_CROP_RATIO
from ran.data.sources import to_rgb
from ran.errors import RanError


def read_image(source: Path | bytes, name: str) -> np.ndarray:
    """H×W×3 ``uint8`` RGB, upright; anything PIL cannot decode is a RanError naming ``name``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()  # decode now: a truncated file fails here
            return to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise RanError(f"{name} does not exist; pass an image file or a folder of images") from None
    except UnidentifiedImageError:
        raise RanError(f"{name} is not an image PIL can read; pass JPEG, PNG, WebP, …") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RanError(f"{name} is damaged ({reason}); replace or remove it") from None


def crop_ratio(small_images: bool) -> float:
    """The share of the short side evaluation keeps: all of it for CIFAR-size data."""
    return 1.0 if small_images else IMAGENET_CROP_RATIO


def central_square(image: np.ndarray, ratio: float) -> np.ndarray:
    """The central square of side ``int(ratio × short side)`` (FFCV's ``get_center_crop``)."""
    height, width = image.shape[:2]
    side = int(ratio * min(height, width))
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def network_input(image: np.ndarray, side: int, small_images: bool) -> np.ndarray:
    """``image`` cut and resized to the network's ``side`` × ``side`` input (uint8 H×W×3)."""
    square = central_square(image, crop_ratio(small_images))
    if square.shape[0] == side:
        return np.ascontiguousarray(square)
    import cv2

    return cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA)
