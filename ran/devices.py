"""Which device a stage runs on, and in which precision: the rules that training,
pretraining, evaluation, the prior and prediction share."""

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


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX-512 BF16 or AMX). Elsewhere
    oneDNN emulates it, slower than fp32; where it has it, a CPU step takes about half the
    time of fp32's (docs/train.md, "Quick profile")."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None: fp32. ``auto``: bf16 on GPUs that have it, else fp16; on a CPU, bf16 where it
    computes bf16 natively, else fp32."""
    import torch

    if precision == "fp32":
        return None
    if precision == "auto" and device.type != "cuda":
        return torch.bfloat16 if cpu_computes_bf16() else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
