"""DINO (Caron et al., 2021) from lightly's parts: a student and a momentum teacher, each a timm
ViT with lightly's projection head, lightly's loss (teacher centring and sharpening), and the
paper's schedules as one function of the step.

The teacher starts as a copy of the student (built twice from one seed: lightly's head holds
weight-normed layers, which ``deepcopy`` refuses) and only ever moves by the EMA update;
it is the network kept, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ran.config import PretrainParams
from ran.prior.vit import load_vit


class Dino(torch.nn.Module):
    """Student and teacher (backbone + head) and the loss, whose centre is state too."""

    def __init__(self, params: PretrainParams) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.params = params
        self.student, self.student_head = self._network(params.drop_path)
        self.teacher, self.teacher_head = self._network(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher)
        deactivate_requires_grad(self.teacher_head)
        self.loss = DINOLoss(
            output_dim=params.out_dim,
            warmup_teacher_temp=params.teacher_temp[0],
            teacher_temp=params.teacher_temp[1],
            student_temp=params.student_temp,
        )

    def _network(self, drop_path: float) -> tuple[Any, Any]:
        import warnings

        from lightly.models.modules import DINOProjectionHead

        p = self.params
        torch.manual_seed(p.seed)
        backbone = load_vit(
            p.vit, None, p.size, random_init=True, seed=p.seed, drop_path_rate=drop_path
        )
        with warnings.catch_warnings():  # lightly's head uses the older weight_norm
            warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm`", FutureWarning)
            head = DINOProjectionHead(
                backbone.embed_dim,
                p.hidden_dim,
                p.bottleneck_dim,
                p.out_dim,
                batch_norm=p.head_batch_norm,
                norm_last_layer=p.norm_last_layer,
            )
        return backbone.train().requires_grad_(True), head

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The student's weights (decayed) and its biases and norms (not), as DINO does."""
        decayed, plain = [], []
        for module in (self.student, self.student_head):
            for param in module.parameters():
                if param.requires_grad:
                    (plain if param.ndim <= 1 else decayed).append(param)
        return [{"params": decayed}, {"params": plain, "weight_decay": 0.0}]

    def forward(self, views: list[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        """The loss of one batch: the teacher sees the global views (the first two), the
        student every view."""
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher(v)).float() for v in views[:2]]
        student_out = [self.student_head(self.student(v)).float() for v in views]
        return self.loss(teacher_out, student_out, teacher_temp=teacher_temp)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.student, self.teacher, momentum)
        update_momentum(self.student_head, self.teacher_head, momentum)

    def cancel_last_layer_gradients(self) -> None:
        """DINO keeps the head's last layer fixed for its first epoch(s)."""
        for param in self.student_head.last_layer.parameters():
            param.grad = None


@dataclass(frozen=True)
class Settings:
    """What the schedules give one step."""

    lr: float
    weight_decay: float
    teacher_temp: float
    momentum: float
    freeze_last_layer: bool


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def schedule(params: PretrainParams, step: int, steps_per_epoch: int, steps: int) -> Settings:
    """DINO's schedules at ``step`` of ``steps``: a linear lr warm-up to lr × batch / 256,
    then a cosine to ``min_lr``; weight decay and teacher momentum on cosines (the latter to
    1); the teacher temperature warmed up linearly."""
    epoch = step / steps_per_epoch
    peak = params.lr * params.batch_size / 256
    warmup = params.warmup_epochs * steps_per_epoch
    if step < warmup:
        lr = peak * step / warmup
    else:
        lr = _cosine(peak, params.min_lr, (step - warmup) / max(steps - warmup, 1))
    start_temp, end_temp = params.teacher_temp
    if epoch < params.teacher_temp_epochs:
        temp = start_temp + (end_temp - start_temp) * epoch / params.teacher_temp_epochs
    else:
        temp = end_temp
    return Settings(
        lr=lr,
        weight_decay=_cosine(*params.weight_decay, step / steps),
        teacher_temp=temp,
        momentum=_cosine(params.momentum_teacher, 1.0, step / steps),
        freeze_last_layer=epoch < params.freeze_last_layer_epochs,
    )
