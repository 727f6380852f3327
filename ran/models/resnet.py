"""ImageNet baselines of the paper's Table 6: ResNet-50 and ResNet-152.

These are torchvision's implementations (He et al., CVPR 2016; stride in the 3x3
convolution, "v1.5"), wrapped rather than re-written: the baseline should be the network
everyone else measures too. Pre-activation ResNet-164 for CIFAR lives in
:mod:`ran.models.ran`, since it is the attention network's table without attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from ran.models.registry import Variant, register


def _torchvision_builder(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Builder taking only ``num_classes`` (no width multiplier: torchvision has none)."""

    def build(num_classes: int) -> nn.Module:
        return factory(weights=None, num_classes=num_classes)

    return build


# Reference numbers: He et al. 2016 / torchvision model card (ResNet-50 v1.5: 4.1 GMACs;
# ResNet-152: 60.2M, 11.3 GFLOPs as quoted in the RAN paper's Table 6).
for _depth, _factory, _params, _macs, _source in [
    (50, torchvision.models.resnet50, 25.6, 4.1, "torchvision"),
    (152, torchvision.models.resnet152, 60.2, 11.3, "Wang et al. 2017"),
]:
    register(
        Variant(
            "resnet",
            _depth,
            "imagenet",
            _torchvision_builder(_factory),
            ref_params=_params,
            ref_macs=_macs,
            ref_source=_source,
        )
    )
