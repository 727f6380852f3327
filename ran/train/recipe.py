"""The paper's recipes, the network a run trains, and its optimiser and schedule.

Everything here is a pure function of :class:`~ran.config.TrainParams` and the data's
geometry, so a resumed run rebuilds exactly the objects whose state the checkpoint holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ran.config import TrainParams

# Iteration-based, as the paper states them (Sec. 4.1 and 4.2).
PAPER_ITERATIONS = {"cifar": 160_000, "imagenet": 530_000}
PAPER_MILESTONES = {"cifar": [64_000, 96_000], "imagenet": [200_000, 400_000, 500_000]}


@dataclass(frozen=True)
class Recipe:
    """The resolved training plan: iterations and milestones filled in from the data."""

    kind: str  # cifar | imagenet: which variant and augmentation the data calls for
    iterations: int
    milestones: list[int]

    @classmethod
    def resolve(cls, params: TrainParams, kind: str) -> Recipe:
        return cls(
            kind,
            params.iterations or PAPER_ITERATIONS[kind],
            params.milestones if params.milestones is not None else PAPER_MILESTONES[kind],
        )


def model_options(params: TrainParams) -> dict[str, Any]:
    """The builder options of the chosen family (a ResNet takes only ``width``, vitmask its
    mask strength too)."""
    if params.family == "attention":
        return {
            "arl": params.learning == "arl",
            "attention": params.attention,
            "mask": params.mask.replace("-", "_"),
            "width": params.width,
        }
    if params.family == "vitmask":
        return {"strength": params.mask_strength, "width": params.width}
    return {"width": params.width} if params.width != 1.0 else {}


def parameter_groups(params: TrainParams, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters, BatchNorm's in a group of their own when their learning
    rate is scaled (airbench94's 64x on the shifts, with weight decay divided alike so the
    decay per step stays the same). ``freeze_norm_scale`` takes the BN scales out of
    training: they stay 1. One group, as before, when neither applies."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if params.freeze_norm_scale:
        for norm in norms:
            if norm.weight is not None:
                norm.weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if params.norm_lr_scale == 1.0:
        return [{"params": trainable}]
    in_norms = {id(p) for m in norms for p in m.parameters() if p.requires_grad}
    scale = params.norm_lr_scale
    return [
        {"params": [p for p in trainable if id(p) not in in_norms]},
        {
            "params": [p for p in trainable if id(p) in in_norms],
            "lr": params.lr * scale,
            "weight_decay": params.weight_decay / scale,
        },
    ]


def make_optimizer(params: TrainParams, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(params, model)
    if params.optimizer == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=params.lr,
            betas=(params.momentum, 0.999),
            weight_decay=params.weight_decay,
        )
    return torch.optim.SGD(
        groups,
        lr=params.lr,
        momentum=params.momentum,
        nesterov=params.nesterov and params.momentum > 0,
        weight_decay=params.weight_decay,
    )


def linear_factor(iteration: int, warmup: int, total: int) -> float:
    """airbench94's schedule as a multiple of the peak rate: 0.2 -> 1 over the warm-up,
    then linearly down to 0.07 at ``total`` (a plain function: LambdaLR's state is data)."""
    if iteration < warmup:
        return 0.2 + 0.8 * iteration / warmup
    return 1.0 - 0.93 * (iteration - warmup) / max(total - warmup, 1)


def make_schedule(
    params: TrainParams, recipe: Recipe, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per iteration; torch's own schedulers, whose state dicts are plain data."""
    sched = torch.optim.lr_scheduler
    if params.schedule == "linear":
        warmup, total = min(params.warmup, recipe.iterations - 1), recipe.iterations
        return sched.LambdaLR(optimizer, partial(linear_factor, warmup=warmup, total=total))
    if params.schedule == "step":
        return sched.MultiStepLR(optimizer, recipe.milestones, gamma=0.1)
    if params.schedule == "onecycle":
        # A quarter warm-up; a run of a few iterations needs a longer share for torch's two
        # phases to each span a step (4 iterations at 0.25 divide by zero).
        warmup_share = min(max(0.25, 1.5 / recipe.iterations), 0.75)
        return sched.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=recipe.iterations, pct_start=warmup_share
        )
    warmup = min(params.warmup, recipe.iterations - 1)
    cosine = sched.CosineAnnealingLR(optimizer, T_max=recipe.iterations - warmup)
    if warmup == 0:
        return cosine
    ramp = sched.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
