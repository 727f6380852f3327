"""One study cell: for each of its seeds, noise → train → evaluate in one process, each a
tagged MLflow run.

A cell is one DVC stage (``studies/dvc.yaml``), so DVC caches it and re-runs only what
changed; running the steps in one process spares two interpreter starts per seed. Its output
folder holds one folder per seed (:func:`ran.paths.seed_folder`), each with the three stages'
folders; a killed seed resumes its training from ``train/checkpoint-last.pt`` (the DVC
output is ``persist``), and a seed already done with the same inputs is not run again.
"""

from __future__ import annotations

import hashlib
import json
import sys
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
    study_seeds,
)
from ran.data.sources import sha256_file
from ran.evaluate import tracked_evaluate
from ran.noise.stage import tracked_noise
from ran.outputs import atomic_write
from ran.studies.tables import Cell, Study
from ran.train.stage import train_model

CellParams = tuple[NoiseParams, TrainParams, EvaluateParams]
FINGERPRINT = "params.json"  # in a seed's folder, written once its evaluate output is there
METRICS = Path("evaluate") / "metrics.json"  # in a seed's folder
CODE = Path(__file__).resolve().parents[1]  # the ran package


def cell_params(
    cell: Cell, profile: str, path: Path = PARAMS_FILE, study: str | None = None
) -> CellParams:
    """The cell's parameters: ``params.yaml``'s section, then the profile's overlay
    (``quick.<section>``), the studies' overlay (``studies.<profile>.<section>``), what the
    cell itself sets (a depth, a noise rate; with the quick profile's stand-in networks) and
    last what its study's profile changes
    (``studies.<study>.<profile>.<section>``: the vitmask study's input size and length)."""

    def section(name: str, model: type) -> Any:
        overlays = (
            study_overlay(name, profile, path),
            cell.setting_for(profile).get(name, {}),
            study_overlay(name, profile, path, study),
        )
        return profiled_section(name, model, profile, path, *overlays)

    return (
        section("noise", NoiseParams),
        section("train", TrainParams),
        section("evaluate", EvaluateParams),
    )


def seed_params(
    cell: Cell, profile: str, seed: int, path: Path = PARAMS_FILE, study: str | None = None
) -> CellParams:
    """:func:`cell_params` for the cell's seed ``seed``: ``train.seed`` and ``noise.seed``
    offset by ``seed``, so the spread over seeds is that of the weights' initialisation, the
    data order and augmentation, and of which labels the noise flips."""
    noise, train, evaluate = cell_params(cell, profile, path, study)
    return (
        noise.model_copy(update={"seed": noise.seed + seed}),
        train.model_copy(update={"seed": train.seed + seed}),
        evaluate,
    )


def cell_tags(study: Study, cell: Cell, profile: str) -> dict[str, str]:
    """What the report finds a cell's runs by (each seed's runs add ``study.seed``)."""
    return {
        "study": study.name,
        "study.cell": cell.name,
        "study.row": cell.row,
        "study.column": cell.column,
        "study.profile": profile,
    }


def input_digests(data: Path, prior: Path | None) -> dict[str, Any]:
    """What a seed's results depend on besides its parameters: the data (its ingest
    ``meta.json`` holds the splits' hashes), the prior's maps and the ``ran`` package's code.
    DVC re-runs a cell when any of them changes; its seeds must not then be kept."""
    code = hashlib.sha256()
    for module in sorted(CODE.rglob("*.py")):
        code.update(f"{module.relative_to(CODE)}\0".encode() + module.read_bytes())
    maps = None
    if prior is not None:
        maps = {f"{name}_sha256": sha256_file(prior / f"{name}.npy") for name in ("train", "val")}
    return {
        "data": {"path": str(data), "meta_sha256": sha256_file(data / "meta.json")},
        "prior": maps and {"path": str(prior), **maps},
        "code_sha256": code.hexdigest(),
    }


def fingerprint(params: CellParams, inputs: dict[str, Any]) -> dict[str, Any]:
    """A seed's resolved parameters and its ``inputs`` (:func:`input_digests`), as JSON."""
    noise, train, evaluate = params
    sections = {"noise": noise, "train": train, "evaluate": evaluate}
    values = {name: model.model_dump(mode="json") for name, model in sections.items()}
    return json.loads(json.dumps({**values, **inputs}))


def seed_done(folder: Path, expected: dict[str, Any]) -> bool:
    """Whether the seed in ``folder`` has its evaluate output, made from ``expected``."""
    written = folder / FINGERPRINT
    if not (folder / METRICS).is_file() or not written.is_file():
        return False
    return json.loads(written.read_text()) == expected


def run_seed(
    params: CellParams,
    data: Path,
    out: Path,
    experiment: str,
    tags: dict[str, str],
    prior: Path | None = None,
) -> dict[str, Any]:
    """One seed of a cell into ``out/{noise,train,evaluate}``; returns its test metrics."""
    noise, train, evaluate = params
    tracked_noise(noise, data, out / "noise", experiment, tags=tags)
    train_model(
        train,
        data,
        out / "train",
        experiment,
        labels=out / "noise" / "labels.npy",
        resume="auto",
        tags=tags,
        prior=prior,
    )
    model = out / "train" / "model.pt"
    return tracked_evaluate(model, data, out / "evaluate", evaluate, experiment, tags, prior)


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
) -> list[dict[str, Any]]:
    """Run ``cell``'s seeds k = 0 … ``studies.<profile>.seeds`` - 1 on ``data`` (with the ViT
    ``prior`` maps, for a vitmask cell), seed k into ``out/seed-<k>`` with its parameters
    (:func:`seed_params`) and its runs tagged ``study.seed``; returns each seed's test
    metrics.

    A seed whose evaluate output was made from the same parameters and inputs (its
    :func:`fingerprint`, written to ``params.json`` once it is done) is kept: growing the
    count from 3 to 5 runs seeds 3 and 4 alone. Its fingerprint goes before it is re-run, so
    it only ever describes what the folder holds."""
    inputs = input_digests(data, prior)
    results = []
    for seed in range(study_seeds(profile, path)):
        params = seed_params(cell, profile, seed, path, study.name)
        folder = paths.seed_folder(out, seed)
        expected = fingerprint(params, inputs)
        if seed_done(folder, expected):
            print(f"cell {cell.name}, seed {seed}: done with these inputs, kept", file=sys.stderr)
            results.append(json.loads((folder / METRICS).read_text()))
            continue
        (folder / FINGERPRINT).unlink(missing_ok=True)
        seed_tags = {**(tags or {}), **cell_tags(study, cell, profile), "study.seed": str(seed)}
        results.append(run_seed(params, data, folder, experiment, seed_tags, prior))
        _write_fingerprint(folder, expected)
    return results


def _write_fingerprint(folder: Path, expected: dict[str, Any]) -> None:
    text = json.dumps(expected, indent=2) + "\n"
    atomic_write(folder / FINGERPRINT, lambda tmp: tmp.write_text(text))


def cell_data(cell: Cell) -> tuple[Path, Path | None]:
    """The ingest output a cell trains on and the prior it reads (``None``: none): the main
    pipeline's for CIFAR-10, ``data/<dataset>/ingest`` for another data set
    (:func:`ran.paths.ingest_folder`), and ``data/prior/<dataset>`` for the prior
    (``data/prior/<dataset>-constant`` for the control's constant map)."""
    data = cell.setting.get("data", {})
    dataset = data.get("dataset", paths.MAIN_DATASET)
    kind = data.get("prior")
    prior = paths.prior_folder(dataset, kind == paths.CONSTANT) if kind else None
    return paths.ingest_folder(dataset), prior
