"""Residual units: the bricks every network in :mod:`ran.models` is made of.

Both unit types share one constructor signature, ``unit(in_channels, out_channels, stride)``,
so the attention module and the network builder can take either as a plain factory.
The class attribute ``preact`` tells consumers whether a unit's output is a raw sum that
the next consumer must normalise (pre-activation, the authors' Attention-56/92) or an
already activated feature (post-activation, the authors' AttentionNeXt-56).
"""

from __future__ import annotations

import torch
from torch import nn


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias: every convolution in the Caffe definitions has none."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False
    )


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit (He et al., ECCV 2016), as in the authors' prototxt.

    BN-ReLU-conv1x1, BN-ReLU-conv3x3 (carries the stride), BN-ReLU-conv1x1 with a 4x
    expansion. The output is the raw sum of residual and shortcut; whoever consumes it
    applies its own BN-ReLU. When the shape changes the projection shortcut reads the
    pre-activated input (``branch2`` in the prototxt reads ``.../bn``), otherwise the
    shortcut is the raw input.
    """

    preact = True
    expansion = 4
    channel_step = 4  # output widths must split into the 4x expansion

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        mid = out_channels // self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, out_channels)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = conv1x1(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


class ResNeXtBottleneck(nn.Module):
    """Post-activation ResNeXt unit (Xie et al., CVPR 2017), as in AttentionNeXt-56.

    conv1x1-BN-ReLU, grouped conv3x3-BN-ReLU (32 groups, carries the stride),
    conv1x1-BN, plus the shortcut (conv1x1-BN when the shape changes), then ReLU. The
    inner width is half the output width (128 groups-of-4 for a 256-wide unit), as in the
    authors' AttentionNeXt-56 prototxt.
    """

    preact = False
    expansion = 2
    groups = 32
    channel_step = 64  # output / expansion must split into 32 groups

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        mid = out_channels // self.expansion
        self.conv1 = conv1x1(in_channels, mid)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride, groups=self.groups)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
            if needs_projection
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ConvUnit(nn.Module):
    """airbench94's unit (K. Jordan, cifar10-airbench): conv3x3, then 2x2 max-pooling when
    it strides, BN, GELU; no shortcut. Its 2x2 pooling after a full-resolution convolution
    learns faster per second on a CPU than a strided bottleneck, which is why the quick
    profile's network is built from it.

    The first ``in_channels`` filters start as the identity (a Dirac kernel), as in
    airbench94, so a fresh stack of units passes its input through.
    """

    preact = False
    expansion = 1
    channel_step = 8

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"a ConvUnit strides by 1 or 2 (max-pooling), got {stride}")
        self.conv = conv3x3(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2) if stride == 2 else nn.Identity()
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.GELU()

    def init_weights(self) -> None:
        nn.init.kaiming_uniform_(self.conv.weight, a=5**0.5)  # torch's default for a conv
        weight = self.conv.weight.data
        nn.init.dirac_(weight[: weight.size(1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.pool(self.conv(x))))


class WhiteningStem(nn.Module):
    """airbench94's first layer: a 2x2 convolution without padding whose 24 filters are the
    whitened principal components of the training images' 2x2 patches and their negatives,
    then GELU. The filters are fitted to data (:meth:`fit`) and frozen; the bias learns.
    Decorrelated inputs are what let the following layers take airbench's large steps."""

    kernel = 2
    width = 2 * 3 * kernel**2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.width, self.kernel, padding=0, bias=True)
        self.conv.weight.requires_grad_(False)
        nn.init.zeros_(self.conv.bias)
        self.act = nn.GELU()

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the filters from normalised ``images`` (N×3×H×W), a few thousand suffice."""
        k = self.kernel
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3)
        flat = patches.reshape(-1, 3 * k * k)
        covariance = flat.T @ flat / len(flat)
        values, vectors = torch.linalg.eigh(covariance, UPLO="U")
        values, vectors = values.flip(0), vectors.T.flip(0)
        scaled = (vectors / torch.sqrt(values + eps)[:, None]).reshape(-1, 3, k, k)
        self.conv.weight.copy_(torch.cat((scaled, -scaled)).to(self.conv.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


Unit = type[PreActBottleneck] | type[ResNeXtBottleneck] | type[ConvUnit]
