"""Where the pipeline keeps each stage's output, relative to the repository root.

The one place the CLI's defaults, the DVC stage scripts (``pipeline/``) and the studies
read these paths from. ``dvc.yaml`` and ``studies/dvc.yaml`` spell them out literally, as
DVC needs; ``tests/test_architecture.py`` checks that they agree with this module.
"""

from __future__ import annotations

from pathlib import Path

MAIN_DATASET = "cifar10"  # the main pipeline's data set: its ingest output is INGEST

DATA = Path("data")
INGEST = DATA / "ingest"
NOISE = DATA / "noise"
LABELS = NOISE / "labels.npy"
TRAIN = DATA / "train"
MODEL = TRAIN / "model.pt"
EVALUATE = DATA / "evaluate"
PRETRAIN = DATA / "pretrain"
PRIORS = DATA / "prior"
STUDIES = DATA / "studies"
REPORTS = Path("reports")


def ingest_folder(dataset: str) -> Path:
    """``dataset``'s ingest output: the main pipeline's for CIFAR-10, else
    ``data/<dataset>/ingest`` (``studies/dvc.yaml`` ingests it)."""
    return INGEST if dataset == MAIN_DATASET else DATA / dataset / "ingest"


VIT_WEIGHTS = "vit.safetensors"  # the pretrain stage's ViT, in its output folder


def pretrain_folder(dataset: str) -> Path:
    """The pretrain stage's output for ``dataset``: the ViT trained on its train images
    (:data:`VIT_WEIGHTS`), its report and curves."""
    return PRETRAIN / dataset


CONSTANT = "constant"  # the control prior's suffix: data/prior/<dataset>-constant


def prior_folder(dataset: str, constant: bool = False) -> Path:
    """The prior stage's output for ``dataset``: the ViT's maps, or (``constant``) the
    control's, every weight equal on the same grid, in ``data/prior/<dataset>-constant``."""
    return PRIORS / (f"{dataset}-{CONSTANT}" if constant else dataset)


def prior_name(name: str) -> tuple[str, bool]:
    """A prior stage's key (``cifar10``, ``cifar10-constant``) → (its data set, whether it is
    the constant control): the inverse of :func:`prior_folder`'s name."""
    dataset = name.removesuffix(f"-{CONSTANT}")
    return dataset, dataset != name


def cell_folder(study: str, cell: str) -> Path:
    """A study cell's output: one :func:`seed_folder` per seed it ran."""
    return STUDIES / study / cell


SEED_FOLDERS = "seed-*"  # the seed folders of a cell's output, as a glob


def seed_folder(cell: Path, seed: int) -> Path:
    """Seed ``seed``'s run of the cell whose output is ``cell``: its noise, train and
    evaluate folders, and the fingerprint of the inputs they were made from."""
    return cell / f"seed-{seed}"


def report_folder(study: str) -> Path:
    """A study's report: report.md, report.png, results.json, and the dvc.yaml declaring
    the last two as DVC metrics and plots."""
    return REPORTS / study
