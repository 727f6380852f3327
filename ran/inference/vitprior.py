"""A vitmask network's second input at prediction time: the ViT prior map of each image.

``model.pt`` records what made the maps the network was trained on (the ``prior`` stage's
``report.json``: ViT, init, weights file and its sha256, input size, aggregation, seed).
:func:`network_prior` rebuilds that ViT through :func:`ran.prior.vit.prior_source`, the code
the stage runs, and :func:`prior_maps` runs it on the uint8 batch :meth:`Predictor.inputs
<ran.inference.predictor.Predictor.inputs>` cuts, which are the pixels the stage's test loader
gave for the image's record, and rounds the maps to float16 as the stage stores them. So a
test image predicted from its file gets the map, and the probabilities, of its record.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ran.data.sources import sha256_file
from ran.errors import RanError

if TYPE_CHECKING:
    import torch

    from ran.prior.vit import PriorSource

WEIGHTS_OPTION = "--vit-weights"


def prior_weights(prior: dict[str, Any], given: Path | None, model: str) -> Path | None:
    """The ViT weights file the prior of ``model`` was made from, or ``None`` when it was
    made from none (init random or constant: seeded; pretrained without a file: timm's
    download; trained: always the file `ran-cli pretrain` wrote). ``given`` is tried, else
    the path the prior stage was given; a file whose sha256 is not the recorded one, or none
    at all, is a one-line error."""
    if prior.get("init", "pretrained") not in ("pretrained", "trained"):
        return None  # only published or trained-here weights come from a file
    digest, recorded = prior.get("weights_sha256"), prior.get("weights")
    if given is None and not digest:
        return None  # timm downloads them, as it did for the prior stage
    path = given if given is not None else Path(recorded) if recorded else None
    if path is None or not path.is_file():
        raise RanError(
            f"{model} takes a prior made from the ViT weights {recorded or 'file'} (sha256 "
            f"{str(digest)[:12]}…), which are not here: pass that file with {WEIGHTS_OPTION}, "
            "or use the MLflow model, which carries it"
        )
    if digest and sha256_file(path) != digest:
        raise RanError(
            f"ViT weights {path} are not those the prior of {model} was made from (sha256 "
            f"{digest[:12]}…, the file's {sha256_file(path)[:12]}…); pass {recorded or 'those'}"
        )
    return path


def network_prior(
    record: dict[str, Any], model: str, weights: Path | None = None, device: Any = "cpu"
) -> PriorSource:
    """The :class:`~ran.prior.vit.PriorSource` of the prior ``record`` (a vitmask
    ``model.pt``'s) was trained with; ``weights``: the ViT's file, if not where the prior
    stage read it."""
    from ran.prior.vit import prior_source

    prior = record.get("prior")
    if not prior:
        raise RanError(f"{model} takes a ViT prior but does not record which; retrain it")
    return prior_source(
        prior["vit"],
        prior_weights(prior, weights, model),
        prior["size"],
        prior.get("init", "pretrained"),
        prior["aggregate"],
        prior.get("seed") or 0,  # records before the seed was kept: PriorParams' default
        device,
    )


def moved(source: PriorSource, device: Any) -> PriorSource:
    """``source`` with its ViT on ``device``."""
    return type(source)(source.vit.to(device), source.size, source.aggregate)


def prior_maps(source: PriorSource, batch: torch.Tensor, device: Any) -> torch.Tensor:
    """The maps of a uint8 batch (N×3×H×W, as the loaders cut it) as the network reads a
    record's stored map: rounded to float16, as N×1×h×w float32 on ``device``."""
    import torch

    maps = source(batch).to(torch.float16).float()
    return maps[:, None].to(device)
