"""One study cell: noise → train → evaluate in one process, each a tagged MLflow run.

A cell is one DVC stage (``studies/dvc.yaml``), so DVC caches it and re-runs only what
changed; running the three steps in one process spares two interpreter starts per cell. Its
output folder holds the three stages' folders; a killed cell resumes its training from
``train/checkpoint-last.pt`` (the DVC output is ``persist``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ran import paths
from ran.config import (
    PARAMS_FILE,
    EvaluateParams,
    NoiseParams,
    TrainParams,
    profiled_section,
    study_overlay,
)
from ran.evaluate import tracked_evaluate
from ran.noise.stage import tracked_noise
from ran.studies.tables import Cell, Study
from ran.train.stage import train_model


def cell_params(
    cell: Cell, profile: str, path: Path = PARAMS_FILE, study: str | None = None
) -> tuple[NoiseParams, TrainParams, EvaluateParams]:
    """The cell's parameters: ``params.yaml``'s section, then the profile's overlay
    (``quick.<section>``), the studies' overlay (``studies.<profile>.<section>``), what the
    cell itself sets (a depth, a noise rate) and last what its study's profile changes
    (``studies.<study>.<profile>.<section>``: the vitmask study's input size and length)."""

    def section(name: str, model: type) -> Any:
        overlays = (
            study_overlay(name, profile, path),
            cell.setting.get(name, {}),
            study_overlay(name, profile, path, study),
        )
        return profiled_section(name, model, profile, path, *overlays)

    return (
        section("noise", NoiseParams),
        section("train", TrainParams),
        section("evaluate", EvaluateParams),
    )


def cell_tags(study: Study, cell: Cell, profile: str) -> dict[str, str]:
    """What the report finds a cell's runs by."""
    return {
        "study": study.name,
        "study.cell": cell.name,
        "study.row": cell.row,
        "study.column": cell.column,
        "study.profile": profile,
    }


def run_cell(
    study: Study,
    cell: Cell,
    data: Path,
    out: Path,
    experiment: str,
    profile: str,
    tags: dict[str, str] | None = None,
    path: Path = PARAMS_FILE,
    prior: Path | None = None,
) -> dict[str, Any]:
    """Run ``cell`` on ``data`` (with the ViT ``prior`` maps, for a vitmask cell) into
    ``out/{noise,train,evaluate}``; returns the test metrics."""
    noise, train, evaluate = cell_params(cell, profile, path, study.name)
    run_tags = {**(tags or {}), **cell_tags(study, cell, profile)}
    tracked_noise(noise, data, out / "noise", experiment, tags=run_tags)
    labels = out / "noise" / "labels.npy"
    train_model(
        train,
        data,
        out / "train",
        experiment,
        labels=labels,
        resume="auto",
        tags=run_tags,
        prior=prior,
    )
    model = out / "train" / "model.pt"
    return tracked_evaluate(
        model, data, out / "evaluate", evaluate, experiment, tags=run_tags, prior=prior
    )


def cell_data(cell: Cell) -> tuple[Path, Path | None]:
    """The ingest output a cell trains on and the prior it reads (``None``: none): the main
    pipeline's for CIFAR-10, ``data/<dataset>/ingest`` for another data set
    (:func:`ran.paths.ingest_folder`), and ``data/prior/<dataset>`` for the prior."""
    data = cell.setting.get("data", {})
    dataset = data.get("dataset", paths.MAIN_DATASET)
    prior = paths.prior_folder(dataset) if data.get("prior") else None
    return paths.ingest_folder(dataset), prior
