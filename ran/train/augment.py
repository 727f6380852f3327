"""Training augmentation on whole batches, in torch, seeded by (seed, epoch, record index).

FFCV's random operations draw from per-thread numpy state: the order of a seeded loader is
reproducible, its pixels are not. Here every random number an image gets is a function of
``(seed, epoch, record index)`` (a counter-based hash, :func:`record_uniforms`), so an image
is augmented the same way whichever batch, process or resumed run it lands in. That is what
makes a resumed run bit-identical to an uninterrupted one, and a DDP run independent of
how records are sharded.

Geometric augmentations are split into ``sample`` (the random parameters of each image)
and ``apply`` (those parameters on any tensor), so the same crop and flip can be applied to
a per-record map travelling with the image (e.g. a ViT attention map), at its own
resolution. They run after the loader, on the GPU when there is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ran.config import TrainParams
from ran.data.beton import LoaderSpec
from ran.data.transforms import network_side, normalize, resize_to

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixed hash of 64-bit words."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def record_uniforms(seed: int, epoch: int, index: np.ndarray, count: int) -> np.ndarray:
    """``(len(index), count)`` uniforms in [0, 1), a pure function of (seed, epoch, index)."""
    key = _mix(_mix(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
    z = _mix(key ^ np.asarray(index, dtype=np.uint64))[:, None]
    z = _mix(z ^ (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class PadCropFlip:
    """CIFAR's augmentation: zero-pad by ``pad`` (zero is the mean after normalisation),
    random crop back to the image's size, horizontal flip with probability 1/2."""

    side: int
    pad: int = 4

    @property
    def uniforms(self) -> int:
        return 3

    def sample(self, u: np.ndarray) -> torch.Tensor:
        """Per image: (dy, dx, flip) in image pixels, from three uniforms."""
        shifts = np.floor(u[:, :2] * (2 * self.pad + 1)).astype(np.int64)
        return torch.from_numpy(np.column_stack([shifts, u[:, 2] < 0.5]))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``x`` is N×C×H×W at the image's resolution or an integer multiple of it."""
        n, _, h, w = x.shape
        scale = h // self.side
        params = params.to(x.device)
        pad = self.pad * scale
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = params[:, :1] * scale + torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device).expand(n, w)
        cols = torch.where(params[:, 2:3].bool(), w - 1 - cols, cols) + params[:, 1:2] * scale
        batch = torch.arange(n, device=x.device)[:, None, None]
        # Advanced indices around a slice put their dims first: N×H×W×C, i.e. channels-last.
        return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@dataclass(frozen=True)
class ResizedCropFlip:
    """ImageNet's augmentation (Szegedy et al.; torchvision's RandomResizedCrop): a box of
    ``scale`` of the area and ``ratio`` aspect, resized to ``size``; flip with p = 1/2.

    Boxes are in fractions of the image, so ``apply`` works at any resolution.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    attempts: int = 10

    @property
    def uniforms(self) -> int:
        return 4 * self.attempts + 1

    def sample(self, u: np.ndarray) -> torch.Tensor:
        """Per image: (y0, x0, h, w) as fractions of the image, and flip."""
        n = len(u)
        tries = u[:, : 4 * self.attempts].reshape(n, self.attempts, 4)
        area = self.scale[0] + tries[..., 0] * (self.scale[1] - self.scale[0])
        log_r = np.log(self.ratio[0]) + tries[..., 1] * np.log(self.ratio[1] / self.ratio[0])
        aspect = np.exp(log_r)
        w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
        fits = (w <= 1) & (h <= 1)
        first = np.argmax(fits, axis=1)
        rows = np.arange(n)
        ok = fits[rows, first]
        h, w = np.where(ok, h[rows, first], 1.0), np.where(ok, w[rows, first], 1.0)
        y0 = tries[rows, first, 2] * (1 - h)
        x0 = tries[rows, first, 3] * (1 - w)
        flip = u[:, -1] < 0.5
        return torch.from_numpy(np.column_stack([y0, x0, h, w, flip]).astype(np.float32))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        n, _, height, width = x.shape
        p = params.to(x.device)
        boxes = torch.stack(
            [
                torch.arange(n, device=x.device, dtype=p.dtype),
                p[:, 1] * width,
                p[:, 0] * height,
                (p[:, 1] + p[:, 3]) * width,
                (p[:, 0] + p[:, 2]) * height,
            ],
            dim=1,
        )
        out = roi_align(x.float(), boxes, self.size, aligned=True, sampling_ratio=2).to(x.dtype)
        return torch.where(p[:, 4, None, None, None].bool(), out.flip(3), out)


def colour_jitter(x: torch.Tensor, u: np.ndarray, strength: float = 0.4) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s]
    (fb.resnet.torch's ImageNet colour augmentation) on images in [0, 1]."""
    f = torch.from_numpy(1 + strength * (2 * u[:, :3] - 1)).to(x.device, x.dtype)
    x = x * f[:, 0, None, None, None]
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    x = (x - grey.mean((2, 3), keepdim=True)) * f[:, 1, None, None, None] + grey.mean(
        (2, 3), keepdim=True
    )
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    x = (x - grey) * f[:, 2, None, None, None] + grey
    return x.clamp_(0, 1)


def random_erasing(
    x: torch.Tensor,
    u: np.ndarray,
    probability: float,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Zhong et al.'s random erasing on normalised images: with ``probability``, a box of
    ``scale`` of the area and ``ratio`` aspect is set to 0 (the mean)."""
    _, _, h, w = x.shape
    area = scale[0] + u[:, 1] * (scale[1] - scale[0])
    aspect = np.exp(np.log(ratio[0]) + u[:, 2] * math.log(ratio[1] / ratio[0]))
    eh = np.minimum(np.round(np.sqrt(area * aspect) * h), h).astype(np.int64)
    ew = np.minimum(np.round(np.sqrt(area / aspect) * w), w).astype(np.int64)
    y0 = np.floor(u[:, 3] * (h - eh + 1)).astype(np.int64)
    x0 = np.floor(u[:, 4] * (w - ew + 1)).astype(np.int64)
    erase = u[:, 0] < probability

    def span(start: np.ndarray, length: np.ndarray, size: int) -> torch.Tensor:
        positions = torch.arange(size, device=x.device)
        lo = torch.from_numpy(start).to(x.device)[:, None]
        hi = lo + torch.from_numpy(length).to(x.device)[:, None]
        return (positions >= lo) & (positions < hi)

    box = span(y0, eh, h)[:, :, None] & span(x0, ew, w)[:, None, :]
    box &= torch.from_numpy(erase).to(x.device)[:, None, None]
    return x.masked_fill(box[:, None], 0.0)


class BatchTransform:
    """Training augmentation of a uint8 batch: CIFAR pad-4 crop + flip on the normalised
    image; ImageNet random-resized crop + flip + colour jitter; then random erasing; then,
    with progressive resizing or upsampling, the batch at the side of this point in training.

    A per-record map travelling with the images (a ViT prior, N×1×h×w) is resized to the
    images' side and given the same crop, flip and erasing, so it stays over the pixels it
    describes; it is not resized afterwards (the network resizes it to what it needs).
    """

    def __init__(self, spec: LoaderSpec, params: TrainParams, seed: int) -> None:
        self.spec, self.seed, self.erasing = spec, seed, params.random_erasing
        self.params, self.full = params, network_side(spec, params.upsample)
        self.geometry = (
            PadCropFlip(spec.side, params.crop_padding)
            if spec.small_images
            else ResizedCropFlip(spec.side)
        )

    def side(self, progress: float) -> int:
        """Progressive resizing (as ffcv-imagenet does it): ``min_side`` until ``ramp_start``
        of training, then linearly up to the full side at ``ramp_end``, in steps of 4 px."""
        full, low = self.full, self.params.min_side
        if low is None or low >= full:
            return full
        start, end = self.params.ramp_start, max(self.params.ramp_end, self.params.ramp_start)
        share = 1.0 if end == start else min(max((progress - start) / (end - start), 0.0), 1.0)
        return min(full, int(round((low + share * (full - low)) / 4) * 4))

    def resize(self, x: torch.Tensor, progress: float) -> torch.Tensor:
        return resize_to(x, self.side(progress))

    def __call__(
        self, images: torch.Tensor, index: np.ndarray, epoch: int, maps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The augmented batch, and ``maps`` augmented alike (``None`` stays ``None``)."""
        g = self.geometry.uniforms
        u = record_uniforms(self.seed, epoch, index, g + 3 + 5)
        geometry = self.geometry.sample(u[:, :g])
        if maps is not None:
            side = images.shape[-2:]
            maps = F.interpolate(maps.float(), size=side, mode="bilinear", align_corners=False)
            maps = self.geometry.apply(maps, geometry)
        if self.spec.small_images:
            x = self.geometry.apply(normalize(images, self.spec), geometry)
        else:
            x = self.geometry.apply(images.float() / 255, geometry)
            x = colour_jitter(x, u[:, g : g + 3]) * 255
            x = normalize(x, self.spec)
        if self.erasing:
            x = random_erasing(x, u[:, g + 3 :], self.erasing)
            if maps is not None:
                maps = random_erasing(maps, u[:, g + 3 :], self.erasing)
        return x.contiguous(memory_format=torch.channels_last), maps
