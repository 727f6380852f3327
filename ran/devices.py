"""Which device a stage runs on: the one rule that training, evaluation, the prior and
prediction share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ran.errors import RanError

if TYPE_CHECKING:
    import torch


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when CUDA is present, else the CPU."""
    import torch

    if requested == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RanError(
            f"--device {requested}: no CUDA GPU is visible here; use --device cpu or auto"
        )
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device
