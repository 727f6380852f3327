"""The attention module of the Residual Attention Network (Wang et al., CVPR 2017, Sec. 3).

One module is ``p`` units, then a split into a trunk branch (``t`` units) and a soft mask
branch, a fusion, then ``p`` more units. Every switch the paper ablates is a constructor
argument of the same class, so a variant is data, not a copy of the module:

* ``arl``: attention residual learning ``H = (1 + M) * T`` (True) or naive attention
  learning ``H = M * T`` (False), Sec. 3.1 and Table 1;
* ``attention``: the activation that turns mask logits into ``M`` (Sec. 3.3, Table 2):
  ``mixed`` (sigmoid per channel and position), ``channel`` (L2 normalisation across
  channels at each position) or ``spatial`` (per-channel normalisation over positions,
  then sigmoid);
* ``mask``: ``encoder_decoder`` (bottom-up top-down, Sec. 3.2) or ``local`` (the same
  number of units at full resolution, the paper's Table 3 ablation).

The encoder-decoder follows the authors' Caffe prototxt, not the most-used PyTorch port:
3x3/stride-2 max-pooling with padding 0 and Caffe's ceil rounding; ``r`` units after each
pooling; one more unit at the lowest level; on the way up, bilinear upsampling
(``align_corners=True``, Caffe's ``Interp``) *to the size of the feature it restores*,
plus a skip unit applied to that bottom-up feature, then one unit; no skip at the
lowest level or at full resolution; finally BN-ReLU-conv1x1-BN-ReLU-conv1x1 and the
attention function.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ran.errors import RanError
from ran.models.blocks import Unit, conv1x1

AttentionFunction = Literal["mixed", "channel", "spatial"]
MaskStructure = Literal["encoder_decoder", "local"]


class ChannelAttention(nn.Module):
    """f2 of the paper: L2 normalisation across channels at each position; range [-1, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=1)


class SpatialAttention(nn.Module):
    """f3 of the paper: standardise each channel over its positions, then sigmoid.

    ``eps`` keeps a 1x1 feature map (a tiny test input) finite: it then maps to 0.5.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        return torch.sigmoid((x - mean) * torch.rsqrt(var + self.eps))


def attention_function(name: AttentionFunction) -> nn.Module:
    """The module that maps mask logits to the mask ``M`` (``mixed`` is the paper's default)."""
    if name == "mixed":
        return nn.Sigmoid()
    if name == "channel":
        return ChannelAttention()
    if name == "spatial":
        return SpatialAttention()
    raise RanError(
        f"unknown attention function {name!r}; valid: {', '.join(get_args(AttentionFunction))}"
    )


def upsample_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Caffe ``Interp``: bilinear, corners aligned, to the size of a reference feature.

    Taking the size from the feature being restored (never a constant) is what lets the
    same weights run at 32, 224 or 320 px.
    """
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def mask_unit_count(levels: int, r: int) -> int:
    """Units in an encoder-decoder mask body: ``r`` per pooling, one extra at the bottom,
    and a skip unit plus an up unit at every intermediate level.

    For ``r = 1`` this is 8, 5, 2 units at 3, 2, 1 levels: the authors' prototxt.
    """
    return levels * r + 1 + 2 * (levels - 1)


class EncoderDecoderMask(nn.Module):
    """Bottom-up top-down body of the soft mask branch (before the 1x1 tail)."""

    def __init__(self, unit: Unit, channels: int, levels: int, r: int) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"an encoder-decoder mask needs at least one pooling, got {levels}")
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        self.down = nn.ModuleList(
            nn.Sequential(*(unit(channels, channels) for _ in range(r))) for _ in range(levels)
        )
        self.bottom = unit(channels, channels)
        self.skips = nn.ModuleList(unit(channels, channels) for _ in range(levels - 1))
        self.up = nn.ModuleList(unit(channels, channels) for _ in range(levels - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features = []
        for down in self.down:
            x = down(self.pool(x))
            features.append(x)
        x = self.bottom(x)
        for level in reversed(range(len(self.up))):
            reference = features[level]
            x = self.up[level](self.skips[level](reference) + upsample_to(x, reference.shape[-2:]))
        return upsample_to(x, size)


class AttentionModule(nn.Module):
    """Attention module: ``p`` units, trunk (``t`` units) and soft mask, fusion, ``p`` units.

    ``forward(x, masks)`` appends this module's mask ``M`` to ``masks`` when a list is
    given; that is how :class:`ran.models.ran.ResidualAttentionNet` returns its masks.
    """

    def __init__(
        self,
        unit: Unit,
        channels: int,
        *,
        p: int,
        t: int,
        r: int,
        levels: int,
        arl: bool = True,
        attention: AttentionFunction = "mixed",
        mask: MaskStructure = "encoder_decoder",
    ) -> None:
        super().__init__()
        self.arl = arl
        self.pre = nn.Sequential(*(unit(channels, channels) for _ in range(p)))
        self.trunk = nn.Sequential(*(unit(channels, channels) for _ in range(t)))
        if mask == "encoder_decoder":
            body: nn.Module = EncoderDecoderMask(unit, channels, levels, r)
        elif mask == "local":
            count = mask_unit_count(levels, r)
            body = nn.Sequential(*(unit(channels, channels) for _ in range(count)))
        else:
            raise RanError(
                f"unknown mask structure {mask!r}; valid: {', '.join(get_args(MaskStructure))}"
            )
        # Pre-activation units leave a raw sum, so the tail normalises it first; the
        # post-activation ResNeXt units already end in ReLU (AttentionNeXt prototxt).
        head = [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)] if unit.preact else []
        self.mask = nn.Sequential(
            body,
            *head,
            conv1x1(channels, channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            conv1x1(channels, channels),
            attention_function(attention),
        )
        self.post = nn.Sequential(*(unit(channels, channels) for _ in range(p)))

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = self.mask(x)
        if masks is not None:
            masks.append(mask)
        # (1 + M) * T as one fused T + M * T; NAL is the plain product.
        fused = torch.addcmul(trunk, mask, trunk) if self.arl else mask * trunk
        return self.post(fused)
