"""Checkpoints and the final model file, both loadable with ``torch.load(weights_only=True)``.

A checkpoint is the whole training state as a dict of ``state_dict()``s (model, optimiser,
scheduler, grad scaler), the RNG states, the counters (epoch, position in it, iteration,
best held-out score), the curves so far and the MLflow run id: everything a resumed run
needs to continue as if it had never stopped. Files are written to a temporary name and
renamed, so a crash mid-write leaves the previous checkpoint intact.

``model.pt`` holds the weights plus what rebuilds the network without the training code's
configuration: variant, options, number of classes, class names, normalisation, the data's
side and the network's input size (larger for a network trained with ``--upsample``).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ran.errors import RanError

FORMAT = 1
LAST = "checkpoint-last.pt"
MODEL = "model.pt"
BEST = "model-best.pt"


def save(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary sibling, fsync, then an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, what: str, hint: str) -> dict[str, Any]:
    """A file written by :func:`save`; a missing, truncated or foreign file is a RanError."""
    if not path.is_file():
        raise RanError(f"{what} {path} does not exist; {hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RanError(
            f"{what} {path} is unreadable ({reason}); it is truncated or not ours: {hint}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RanError(
            f"{what} {path} is not a checkpoint of this project (format {FORMAT}); {hint}"
        )
    return payload


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network in ``model.pt`` (eval mode, CPU) and its record (everything but weights)."""
    from ran.models import build_model

    record = load(path, "model file", "pass the model.pt written by `ran-cli train`")
    if "arch" not in record or "state_dict" not in record:
        raise RanError(f"model file {path} is a training checkpoint, not a model; pass model.pt")
    arch = record["arch"]
    model = build_model(arch["variant"], arch["num_classes"], **arch["options"])
    model.load_state_dict(record.pop("state_dict"))
    return model.eval(), record
