"""The Residual Attention Network family: one network class, variants as a table of data.

A network is a stem, then stages; a stage is one transition unit (projection shortcut,
maybe stride 2), ``modules`` attention modules and ``plain`` further units; then
(for pre-activation units) a final BN-ReLU, global average pooling and a linear
classifier. Pre-activation ResNet-164 is the same table with no attention modules, so the
baseline shares every line of code with the network it is compared against.

ImageNet rows follow the authors' prototxts (``imagenet_model/Attention-{56,92}-deploy``,
``AttentionNeXt-56-deploy`` in fwang91/residual-attention-network). CIFAR rows are our
reading of the paper, which gives only depths and parameter counts (docs/models.md, section
"Decisions the paper leaves open (CIFAR)" gives the reasons): ResNet-164 widths
(16 -> 64/128/256), modules split evenly over the three stages, mask pooling levels 3/2/1
at 32/16/8 px (the mask bottoms out at 4x4), and three plain units at 8x8 so that
depth = 20 + 12 * modules like the ImageNet networks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from ran.models.attention import AttentionFunction, AttentionModule, MaskStructure
from ran.models.blocks import (
    ConvUnit,
    PreActBottleneck,
    ResNeXtBottleneck,
    Unit,
    WhiteningStem,
    conv3x3,
)
from ran.models.registry import Variant, register

Stem = Literal["cifar", "imagenet", "whiten"]


@dataclass(frozen=True)
class Stage:
    """One resolution: a transition unit to ``width`` at ``stride``, then ``modules``
    attention modules whose masks pool ``levels`` times, then ``plain`` units."""

    width: int
    stride: int
    modules: int = 0
    levels: int = 0
    plain: int = 0


@dataclass(frozen=True)
class NetConfig:
    """Everything that distinguishes one variant from another."""

    stem: Stem
    stem_width: int
    unit: Unit
    stages: tuple[Stage, ...]
    p: int = 1
    t: int = 2
    r: int = 1
    pool: Literal["avg", "max"] = "avg"  # the global pooling before the classifier
    logit_scale: float = 1.0  # airbench94 scales its logits by 1/9
    bn_momentum: float = 0.1  # torch's default; airbench94's BN statistics follow faster (0.4)


def _scaled(channels: int, width: float, step: int) -> int:
    """``channels * width`` rounded to a multiple of ``step`` (at least ``step``): the
    width multiplier used for tiny test builds and nothing else."""
    return max(step, round(channels * width / step) * step)


def _stem(kind: Stem, width: int, preact: bool) -> nn.Module:
    """ImageNet: conv7x7/2-BN-ReLU-maxpool3x3/2 (Caffe ceil rounding, 224 -> 56 px).
    CIFAR: one conv3x3 (ResNet-164), followed by BN-ReLU only for post-activation units,
    whose first convolution reads its input as-is. Whiten: airbench94's data-fitted 2x2
    patch whitening (its width is fixed: 24)."""
    if kind == "whiten":
        return WhiteningStem()
    if kind == "imagenet":
        return nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True),
        )
    layers: list[nn.Module] = [conv3x3(3, width)]
    if not preact:
        layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ResidualAttentionNet(nn.Module):
    """Residual Attention Network (or, without attention modules, a plain ResNet).

    ``forward(x)`` returns logits. ``forward(x, return_masks=True)`` returns
    ``(logits, masks)``: one mask per attention module, in network order, each shaped
    like the trunk feature it weights (``N x C x H x W``) and valued in the attention
    function's range ((0, 1) for mixed and spatial, [-1, 1] for channel).
    """

    def __init__(
        self,
        config: NetConfig,
        num_classes: int,
        *,
        arl: bool = True,
        attention: AttentionFunction = "mixed",
        mask: MaskStructure = "encoder_decoder",
        width: float = 1.0,
    ) -> None:
        super().__init__()
        unit = config.unit
        stem_width = _scaled(config.stem_width, width, 1)
        if config.stem == "whiten":
            stem_width = WhiteningStem.width
        self.stem = _stem(config.stem, stem_width, unit.preact)
        body: list[nn.Module] = []
        channels = stem_width
        for stage in config.stages:
            out = _scaled(stage.width, width, unit.channel_step)
            body.append(unit(channels, out, stage.stride))
            channels = out
            body += [
                AttentionModule(
                    unit,
                    channels,
                    p=config.p,
                    t=config.t,
                    r=config.r,
                    levels=stage.levels,
                    arl=arl,
                    attention=attention,
                    mask=mask,
                )
                for _ in range(stage.modules)
            ]
            body += [unit(channels, channels) for _ in range(stage.plain)]
        self.body = nn.ModuleList(body)
        # Pre-activation units leave a raw sum: normalise it once before pooling.
        self.final = (
            nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
            if unit.preact
            else nn.Identity()
        )
        self.pool = nn.AdaptiveAvgPool2d(1) if config.pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.logit_scale, self.bn_momentum = config.logit_scale, config.bn_momentum
        self._init_weights()

    def _init_weights(self) -> None:
        """He initialisation for convolutions, as in the paper's training setup; a unit with
        its own scheme (airbench's identity-started convolutions) applies it afterwards."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.modules():
            if hasattr(module, "init_weights"):
                module.init_weights()
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = self.bn_momentum

    @property
    def fits_to_data(self) -> bool:
        """Whether part of the network (a whitening stem) is initialised from data."""
        return isinstance(self.stem, WhiteningStem)

    def fit_to_data(self, images: torch.Tensor) -> None:
        """Fit the whitening stem to normalised training ``images``: trainers call it once,
        before step one, when :attr:`fits_to_data`."""
        self.stem.fit(images)

    def forward(
        self, x: torch.Tensor, return_masks: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        masks: list[torch.Tensor] | None = [] if return_masks else None
        x = self.stem(x)
        for block in self.body:
            x = block(x, masks) if isinstance(block, AttentionModule) else block(x)
        x = self.pool(self.final(x)).flatten(1)
        logits = self.fc(x)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        return (logits, masks) if masks is not None else logits


def _imagenet_stages(modules: tuple[int, int, int]) -> tuple[Stage, ...]:
    """Stages 1-3 (56, 28, 14 px) with 3, 2, 1 mask poolings, so every mask bottoms out
    at 7x7; stage 4 is three plain units at 7x7 (``post_res_4_*`` in the prototxt)."""
    return (
        Stage(256, 1, modules[0], levels=3),
        Stage(512, 2, modules[1], levels=2),
        Stage(1024, 2, modules[2], levels=1),
        Stage(2048, 2, plain=2),
    )


def _cifar_stages(modules: int, plain: tuple[int, int, int] = (0, 0, 3)) -> tuple[Stage, ...]:
    """Stages at 32, 16, 8 px with 3, 2, 1 mask poolings (bottom at 4x4), modules split
    evenly; the plain units default to three at 8x8 after the last attention module."""
    per_stage, remainder = divmod(modules, 3)
    if remainder:
        raise ValueError(f"CIFAR networks split modules evenly over 3 stages, got {modules}")
    return (
        Stage(64, 1, per_stage, levels=3, plain=plain[0]),
        Stage(128, 2, per_stage, levels=2, plain=plain[1]),
        Stage(256, 2, per_stage, levels=1, plain=plain[2]),
    )


def _attention_builder(config: NetConfig) -> Callable[..., ResidualAttentionNet]:
    """Builder taking ``num_classes`` and every attention option."""
    return partial(ResidualAttentionNet, config)


def _plain_builder(config: NetConfig) -> Callable[..., ResidualAttentionNet]:
    """Builder for a network without attention modules: only ``width`` applies, so the
    registry rejects ``arl=...`` for a ResNet instead of silently ignoring it."""

    def build(num_classes: int, *, width: float = 1.0) -> ResidualAttentionNet:
        return ResidualAttentionNet(config, num_classes, width=width)

    return build


PAPER = "Wang et al. 2017"

# ImageNet, from the authors' prototxts (p, t, r = 1, 2, 1). Reference numbers: paper Table 6.
_IMAGENET = [
    ("attention", 56, PreActBottleneck, (1, 1, 1), 31.9, 6.2),
    ("attention", 92, PreActBottleneck, (1, 2, 3), 51.3, 10.4),
    ("attentionnext", 56, ResNeXtBottleneck, (1, 1, 1), 31.9, 6.3),
]
for _family, _depth, _unit, _modules, _params, _macs in _IMAGENET:
    register(
        Variant(
            _family,
            _depth,
            "imagenet",
            _attention_builder(NetConfig("imagenet", 64, _unit, _imagenet_stages(_modules))),
            ref_params=_params,
            ref_macs=_macs,
            ref_source=PAPER,
        )
    )

# CIFAR: depth = 20 + 3 * (2p + t) * modules; the paper gives parameter counts only.
_CIFAR = [
    (56, 3, (1, 2, 1), None),
    (92, 6, (1, 2, 1), 1.9),
    (128, 9, (1, 2, 1), None),
    (164, 12, (1, 2, 1), None),
    (236, 18, (1, 2, 1), 5.1),
    (452, 18, (2, 4, 3), 8.6),
]
for _depth, _modules, (_p, _t, _r), _params in _CIFAR:
    register(
        Variant(
            "attention",
            _depth,
            "cifar",
            _attention_builder(
                NetConfig("cifar", 16, PreActBottleneck, _cifar_stages(_modules), p=_p, t=_t, r=_r)
            ),
            ref_params=_params,
            ref_source=PAPER if _params else "",
        )
    )

# Pre-activation ResNet-164 (He et al., ECCV 2016): 3 stages of 18 bottleneck units.
register(
    Variant(
        "resnet",
        164,
        "cifar",
        _plain_builder(NetConfig("cifar", 16, PreActBottleneck, _cifar_stages(0, (17, 17, 17)))),
        ref_params=1.7,
        ref_source="He et al. 2016",
    )
)


# The quick profile's networks: airbench94's layout (K. Jordan's cifar10-airbench: a
# whitening stem, then at widths 64/256/256 a conv-pool-BN-GELU transition and one
# conv-BN-GELU unit, max-pooled, logits scaled by 1/9) with that unit as the trunk of an
# attention module whose mask pools once (the maps are 15, 7 and 3 px at 32 px input).
# depth = stem + 3 x (transition + (2p + t) x modules) + classifier = 8.
_FAST = dict(p=0, t=1, r=1, pool="max", logit_scale=1 / 9, bn_momentum=0.4)
register(
    Variant(
        "attention",
        8,
        "cifar",
        _attention_builder(
            NetConfig(
                "whiten",
                24,
                ConvUnit,
                tuple(Stage(w, 2, modules=1, levels=1) for w in (64, 256, 256)),
                **_FAST,
            )
        ),
        ref_source="airbench94's layout with attention modules (this project)",
    )
)
# The same table without attention modules: airbench94's network itself, the quick
# studies' baseline column.
register(
    Variant(
        "plain",
        8,
        "cifar",
        _plain_builder(
            NetConfig(
                "whiten", 24, ConvUnit, tuple(Stage(w, 2, plain=1) for w in (64, 256, 256)), **_FAST
            )
        ),
        ref_source="airbench94 (K. Jordan, cifar10-airbench)",
    )
)
