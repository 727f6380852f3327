"""The prior's maps as training, evaluation and inference read them: one memory-mapped
array per split, indexed by record like the loaders' indices, and the rule that a network
takes them exactly when its class says so (``takes_prior``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ran.errors import RanError

if TYPE_CHECKING:
    import torch


def prior_for(network: str, takes: bool, prior: Path | None, split: str, meta: dict) -> Any:
    """``split``'s maps when the network takes a prior (``None`` when it does not); a missing
    or needless ``prior`` is a one-line error naming ``network``."""
    if takes and prior is None:
        raise RanError(
            f"{network} needs the ViT attention prior: run `ran-cli prior` on this data and "
            "pass its output with --prior"
        )
    if prior is not None and not takes:
        raise RanError(
            f"--prior is for networks that take a ViT attention prior (--family vitmask); "
            f"{network} takes none"
        )
    return load_prior(prior, split, meta) if prior else None


def prior_batch(maps: Any, index: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """The maps of records ``index`` as N×1×h×w float32 on ``device`` (``None``: no prior)."""
    if maps is None:
        return None
    import torch

    batch = torch.from_numpy(np.asarray(maps[np.asarray(index)], dtype=np.float32))
    return batch[:, None].to(device, non_blocking=True)


def load_prior(prior: Path, split: str, meta: dict) -> np.ndarray:
    """``prior/{split}.npy`` memory-mapped, checked to be the prior of ``meta``'s data."""
    path, report_path = prior / f"{split}.npy", prior / "report.json"
    if not path.is_file() or not report_path.is_file():
        raise RanError(
            f"{prior} is not a prior folder (no {path.name} or report.json): run `ran-cli prior`"
        )
    report = json.loads(report_path.read_text())
    if report.get("data_sha256", {}).get(split) != meta["splits"][split]["sha256"]:
        raise RanError(
            f"prior {prior} was made from other data than this ingest output's {split} split; "
            "run `ran-cli prior` on this ingest output"
        )
    try:
        maps = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise RanError(f"prior file {path} is not a .npy array ({exc}); regenerate it") from None
    if maps.ndim != 3 or len(maps) != meta["splits"][split]["count"]:
        raise RanError(
            f"prior file {path} has shape {maps.shape}, expected ({meta['splits'][split]['count']}"
            ", h, w): regenerate it"
        )
    return maps


def map_statistics(maps: np.ndarray) -> dict[str, float]:
    """How peaked the maps are: normalised entropy (1: uniform) and peak over mean."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    p = flat / np.maximum(flat.sum(1, keepdims=True), 1e-12)
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(1) / np.log(flat.shape[1])
    return {
        "mean_patch_weight_sum": float(flat.sum(1).mean()),
        "mean_normalised_entropy": float(entropy.mean()),
        "mean_peak_over_mean": float((p.max(1) * flat.shape[1]).mean()),
    }
