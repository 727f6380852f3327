"""Parameter and multiply-accumulate counts: facts about an architecture, not timings.

MACs are counted by running the model once under :class:`torch.utils.flop_counter.
FlopCounterMode` on the ``meta`` device: no memory is allocated and no arithmetic is done,
so even Attention-92 at 224 px is counted in well under a second. FlopCounterMode counts
convolutions and matrix products (2 FLOPs per MAC) and nothing else, which is exactly the
convention of the paper's "FLOPs" column (multiply-adds of conv and FC layers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ran.models.registry import Variant, list_variants


def count_params(model: nn.Module) -> int:
    """Learnable parameters (BN scale and shift included, running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_size: int, device: torch.device | str = "meta") -> int:
    """MACs of one forward pass of a single ``3 x input_size x input_size`` image (and, for
    a network that takes a prior map, one at the ViT-S/8 grid of that side)."""
    inputs = [torch.empty(1, 3, input_size, input_size, device=device)]
    if getattr(model, "takes_prior", False):
        grid = max(1, input_size // 8)
        inputs.append(torch.empty(1, 1, grid, grid, device=device))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def variant_complexity(variant: Variant, num_classes: int | None = None) -> dict[str, Any]:
    """One row of the ``ran-cli models`` table: the variant built on the meta device and
    measured, next to the published numbers it should match."""
    with torch.device("meta"):
        model = variant.build(num_classes or variant.default_classes)
    return {
        "name": variant.name,
        "family": variant.family,
        "depth": variant.depth,
        "dataset": variant.dataset,
        "input_size": variant.input_size,
        "params": count_params(model),
        "macs": count_macs(model, variant.input_size),
        "ref_params_m": variant.ref_params,
        "ref_macs_g": variant.ref_macs,
        "ref_source": variant.ref_source,
    }


def model_table() -> list[dict[str, Any]]:
    """Every registered variant with its measured params and MACs."""
    return [variant_complexity(v) for v in list_variants()]
