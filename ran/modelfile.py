"""The model file (``model.pt``) and the checkpoint container it shares with training: one
module writes, reads and interprets it.

Both are dicts saved with ``torch.save`` and loadable with ``torch.load(weights_only=True)``
(no unpickling of code), written all or nothing (:func:`ran.outputs.atomic_write`), and
marked with :data:`FORMAT` so a foreign file is refused with one line.

``model.pt`` holds the weights plus what rebuilds and feeds the network without the
training code's configuration: ``arch`` (variant, options, number of classes), class names,
the data's normalisation, ``data_side`` (what the loader yields) and ``input_size`` (the
network side: larger for a network trained with ``--upsample``), the training iteration,
MLflow run id and, for a vitmask network, what made its prior maps.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ran.data.beton import LoaderSpec
from ran.errors import RanError
from ran.models import build_model
from ran.outputs import atomic_write

if TYPE_CHECKING:
    import torch

FORMAT = 1
MODEL = "model.pt"
BEST = "model-best.pt"
_MODEL_HINT = "pass the model.pt written by `ran-cli train`"


def save(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` all or nothing: a crash mid-write leaves the previous file intact."""
    import torch

    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load(path: Path, what: str, hint: str) -> dict[str, Any]:
    """A file written by :func:`save`; a missing, truncated or foreign file is a RanError."""
    import torch

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


def model_record(
    arch: dict[str, Any],
    state_dict: dict[str, Any],
    meta: dict[str, Any],
    spec: LoaderSpec,
    input_size: int,
    iteration: int,
    run_id: str,
    prior: dict[str, Any] | None,
) -> dict[str, Any]:
    """The content of ``model.pt`` (see the module's docstring)."""
    return {
        "format": FORMAT,
        "arch": arch,
        "state_dict": state_dict,
        "classes": meta["classes"],
        "dataset": meta["dataset"],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_size": input_size,
        "data_side": spec.side,
        "small_images": spec.small_images,
        "iteration": iteration,
        "run_id": run_id,
        "prior": prior,
    }


def read_record(path: Path) -> dict[str, Any]:
    """``model.pt``'s record, weights included (one-line error for anything else)."""
    record = load(path, "model file", _MODEL_HINT)
    if "arch" not in record or "state_dict" not in record:
        raise RanError(f"model file {path} is a training checkpoint, not a model; pass model.pt")
    return record


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network in ``model.pt`` (eval mode, CPU) and its record (everything but weights)."""
    record = read_record(path)
    arch = record["arch"]
    model = build_model(arch["variant"], arch["num_classes"], **arch["options"])
    model.load_state_dict(record.pop("state_dict"))
    return model.eval(), record


def loader_spec(record: dict[str, Any], side: int | None = None) -> LoaderSpec:
    """How to feed the network of ``record``: its data's statistics, at ``side`` (default:
    the network side it was trained at)."""
    mean, std = tuple(record["mean"]), tuple(record["std"])
    return LoaderSpec(mean, std, side or record["input_size"], record["small_images"])


def data_side(record: dict[str, Any]) -> int:
    """The side the loader gave in training (before ``--upsample``); records written before
    it was kept have only the network's side, which was then the same."""
    return record.get("data_side", record["input_size"])
