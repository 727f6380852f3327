"""The paper's recipes, the network a run trains, and its optimiser and schedule.

Everything here is a pure function of :class:`~ran.config.TrainParams` and the data's
geometry, so a resumed run rebuilds exactly the objects whose state the checkpoint holds.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def make_optimizer(params: TrainParams, model: torch.nn.Module) -> torch.optim.Optimizer:
    if params.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(),
            lr=params.lr,
            betas=(params.momentum, 0.999),
            weight_decay=params.weight_decay,
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=params.lr,
        momentum=params.momentum,
        nesterov=params.nesterov and params.momentum > 0,
        weight_decay=params.weight_decay,
    )


def make_schedule(
    params: TrainParams, recipe: Recipe, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per iteration; torch's own schedulers, whose state dicts are plain data."""
    sched = torch.optim.lr_scheduler
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
