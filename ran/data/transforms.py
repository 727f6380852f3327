"""What the network sees of a loader's batch, shared by training, evaluation and inference.

Two sides are named apart: the *data side* (``LoaderSpec.side``: what the loader
yields) and the *network side* (what the network is fed: the data side, or ``upsample``
for small images trained upsampled). ``model.pt`` records both (``data_side``,
``input_size``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ran.data.beton import LoaderSpec

if TYPE_CHECKING:
    import torch


def normalize(images: torch.Tensor, spec: LoaderSpec) -> torch.Tensor:
    """uint8 images on any device → float32, standardised by the data's 0–255 statistics."""
    import torch

    mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def network_side(spec: LoaderSpec, upsample: int | None) -> int:
    """The side the network sees: ``upsample`` for small images when set, else the data's."""
    return upsample if upsample and spec.small_images else spec.side


def resize_to(x: torch.Tensor, side: int) -> torch.Tensor:
    """``x`` at ``side``: bicubic up (the vitmask report's upsampling), area-aware bilinear
    down (progressive resizing)."""
    import torch.nn.functional as F

    if side == x.shape[-1]:
        return x
    if side > x.shape[-1]:
        return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)


def network_view(images: torch.Tensor, spec: LoaderSpec) -> torch.Tensor:
    """uint8 images as the network takes them at test time: normalised, and small images
    bicubic-upsampled to ``spec.side`` when the network was trained upsampled."""
    x = normalize(images, spec)
    return resize_to(x, spec.side) if spec.small_images else x
