"""ViT-guided residual attention: a ResNet-8 whose residuals are refined by masks grown from a
frozen self-supervised ViT's attention (C. Wang, "Refining Residual Mappings Using Regions of
High Attention", Stanford course report).

The Residual Attention Network learns where to look inside the network; this variant takes
the answer from outside it: the [CLS] attention of a DINO ViT (:mod:`ran.prior`), one map per
image, is the input of an attention branch B_a whose sigmoid outputs have the shapes of the
classification branch B_c's features. Block i of B_c is refined with the mask of the block
before it, at strength a:

    F(x_i, m_{i-1}) = a·P(x_{i-1} ⊙ m_{i-1}) + a·x_i,    x_i ← F + x_i

where P is block i's own shortcut (identity, or its strided projection where the shape
changes: the masked input must reach x_i's shape, and the shortcut is the map the block
already uses for that). With a = 0 the refinement adds exactly zero, so the network is
:class:`PatchResNet`, a plain ResNet-8 (a test loads one's weights into the other).

Both branches start with a ConvNeXt-style patchify stem (a 4×4 convolution of stride 4)
instead of conv7×7 + max-pool, as the report does for its 224 px (upsampled CIFAR) inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ran.models.blocks import conv1x1, conv3x3
from ran.models.registry import Variant, register

WIDTHS = (64, 128, 256)  # B_c's feature widths after each basic block
STRIDES = (1, 2, 2)  # ResNet-8's: three stages of one block each
PATCH = 4  # the stem downsamples 4x


def _scaled(widths: tuple[int, ...], width: float) -> tuple[int, ...]:
    return tuple(max(8, round(w * width)) for w in widths)


class BasicBlock(nn.Module):
    """Post-activation basic unit (He et al., CVPR 2016): conv3x3-BN-ReLU-conv3x3-BN plus the
    shortcut (conv1x1-BN where the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
            if needs_projection
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _patchify(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, PATCH, stride=PATCH, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _init(module: nn.Module) -> None:
    """Kaiming-normal convolutions and BN at (1, 0), the report's initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PatchResNet(nn.Module):
    """ResNet-8 with a patchify stem: stem, three basic blocks (strides 1, 2, 2), global
    average pooling, a linear classifier. The classification branch B_c of :class:`ViTMaskNet`
    and its a = 0 baseline."""

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        widths = _scaled(WIDTHS, width)
        self.stem = nn.Sequential(_patchify(3, widths[0]), nn.ReLU(inplace=True))
        ins = (widths[0], *widths[:-1])
        self.blocks = nn.ModuleList(
            BasicBlock(i, o, s) for i, o, s in zip(ins, widths, STRIDES, strict=True)
        )
        self.fc = nn.Linear(widths[-1], num_classes)
        _init(self)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class MaskBlock(nn.Module):
    """One block of the attention branch: conv3x3-BN-ReLU-conv3x3-BN-sigmoid, strided like
    the classification block whose output shape its mask takes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(in_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).sigmoid()


class PriorMasks(nn.Module):
    """The attention branch B_a: the prior map (any resolution; scaled to mean 1, so a
    softmax over 16 or 784 patches gives the same range) resized to the image, a patchify
    stem with a sigmoid (mask 0, the shape of B_c's stem output), then one :class:`MaskBlock`
    per classification block but the last (mask i, the shape of block i's output)."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        widths = _scaled(WIDTHS, width)
        self.stem = _patchify(1, widths[0])
        ins = (widths[0], *widths[:-2])
        self.blocks = nn.ModuleList(
            MaskBlock(i, o, s) for i, o, s in zip(ins, widths[:-1], STRIDES[:-1], strict=True)
        )
        _init(self)

    def forward(self, prior: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
        prior = prior.float()
        prior = prior / prior.mean((2, 3), keepdim=True).clamp_min(1e-12)
        prior = F.interpolate(prior, size=size, mode="bilinear", align_corners=False)
        masks = [self.stem(prior.to(self.stem[0].weight.dtype)).sigmoid()]
        for block in self.blocks:
            masks.append(block(masks[-1]))
        return masks


class ViTMaskNet(nn.Module):
    """B_c refined by B_a's masks at ``strength`` a (see the module docstring).

    ``forward(x, prior)`` returns logits for images ``x`` (N×3×H×W, normalised) and their
    prior maps (N×1×h×w, the ViT's [CLS] attention as stored by the prior stage);
    ``forward(x, prior, return_masks=True)`` returns ``(logits, masks)``, B_a's maps.
    """

    takes_prior = True

    def __init__(self, num_classes: int, strength: float = 1.0, width: float = 1.0) -> None:
        super().__init__()
        if not 0 <= strength <= 1:
            raise ValueError(f"mask strength must be in [0, 1], not {strength}")
        self.strength = strength
        self.classifier = PatchResNet(num_classes, width)
        self.attention = PriorMasks(width)

    def forward(
        self, x: torch.Tensor, prior: torch.Tensor, return_masks: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        c, a = self.classifier, self.strength
        masks = self.attention(prior, x.shape[-2:])
        h = c.stem(x)
        for block, mask in zip(c.blocks, masks, strict=True):
            out = block(h)
            h = out + a * (block.shortcut(h * mask) + out)
        logits = c.head(h)
        return (logits, masks) if return_masks else logits


register(
    Variant(
        "resnet",
        8,
        "cifar",
        PatchResNet,
        ref_source="ResNet-8 with a patchify stem (the vitmask report's a = 0)",
    )
)
register(
    Variant(
        "vitmask",
        8,
        "cifar",
        ViTMaskNet,
        ref_source="C. Wang, Refining Residual Mappings Using Regions of High Attention",
    )
)
