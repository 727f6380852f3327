"""Model zoo of the project: the Residual Attention Network family and its baselines.

``build_model("attention92-cifar", num_classes=100, arl=True, attention="mixed")`` builds a
network; ``find_variant("attention", 92, "cifar")`` is the lookup behind
``ran-cli train --depth 92``; ``list_variants()`` and ``model_table()`` enumerate them.
Importing this package registers every family (``ran``, ``resnet``, ``vitmask``).
"""

from ran.models import ran as _ran  # noqa: F401 - registers the attention family
from ran.models import resnet as _resnet  # noqa: F401 - registers the ImageNet ResNets
from ran.models import vitmask as _vitmask  # noqa: F401 - registers ResNet-8 and vitmask
from ran.models.complexity import count_macs, count_params, model_table, variant_complexity
from ran.models.ran import ResidualAttentionNet
from ran.models.registry import (
    Variant,
    build_model,
    find_variant,
    get_variant,
    list_variants,
)

__all__ = [
    "ResidualAttentionNet",
    "Variant",
    "build_model",
    "count_macs",
    "count_params",
    "find_variant",
    "get_variant",
    "list_variants",
    "model_table",
    "variant_complexity",
]
