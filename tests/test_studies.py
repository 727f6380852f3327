"""The paper's studies: their grids, a cell's parameters, the report, and a whole study run
by DVC in a temporary repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, run_ok

from ran.config import EvaluateParams, NoiseParams, TrainParams
from ran.errors import RanError
from ran.paths import ingest_folder
from ran.studies import STUDIES, get_study
from ran.studies.cell import cell_data, cell_params
from ran.studies.report import CellResult, markdown, ordering, write_report


def test_dvc_matrix_lists_every_cell_of_every_study() -> None:
    stages = yaml.safe_load((REPO / "studies/dvc.yaml").read_text())["stages"]
    for name, study in STUDIES.items():
        assert stages[name]["cmd"] == f"python pipeline/report.py {name}"
        if name == "vitmask":  # two data sets: see the next test
            continue
        assert stages[f"{name}-cell"]["matrix"]["cell"] == [c.name for c in study.cells]
        assert stages[f"{name}-cell"]["cmd"] == f"python pipeline/study.py {name} ${{item.cell}}"


def test_vitmask_stages_depend_on_the_data_they_read() -> None:
    """Every vitmask cell has a stage whose data dependencies are what the cell reads
    (:func:`cell_data`), and each data set's prior stage depends on that data set alone."""
    stages = yaml.safe_load((REPO / "studies/dvc.yaml").read_text())["stages"]
    masked, baseline, prior = stages["vitmask-cell"], stages["vitmask-baseline"], stages["prior"]
    assert masked["do"]["cmd"] == "python pipeline/study.py vitmask ${key}"
    assert masked["do"]["deps"][-2:] == ["${item.ingest}", "${item.prior}"]
    assert baseline["do"]["cmd"] == "python pipeline/study.py vitmask ${key}-attention56"
    assert baseline["do"]["deps"][-1] == prior["do"]["deps"][-1] == "${item}"
    staged = {cell: (data["ingest"], data["prior"]) for cell, data in masked["foreach"].items()}
    staged |= {f"{name}-attention56": (data, None) for name, data in baseline["foreach"].items()}
    reads = {}
    for cell in get_study("vitmask").cells:
        data, cell_prior = cell_data(cell)
        reads[cell.name] = (str(data), cell_prior and str(cell_prior))
    assert staged == reads
    assert prior["foreach"] == {name: str(ingest_folder(name)) for name in ("cifar10", "cifar100")}


def test_grids_have_the_papers_shape_and_numbers() -> None:
    noise = get_study("noise")
    assert len(noise.cells) == 8
    cell = noise.cell("r70-resnet164")
    assert cell.setting["noise"] == {"kind": "symmetric", "rate": 0.7}
    assert cell.setting["train"] == {"family": "resnet", "depth": 164}
    assert cell.paper_error == 17.21 and noise.cell("r70-attention92").paper_error == 15.75
    nal164 = get_study("arl-nal").cell("attention164-nal")
    assert nal164.setting["train"]["learning"] == "nal" and nal164.paper_error == 7.18
    assert nal164.setting["noise"]["kind"] == "none"  # the ablations train on clean labels
    assert [c.paper_error for c in get_study("attention").cells] == [5.52, 6.24, 6.33]
    assert [c.paper_error for c in get_study("mask").cells] == [5.52, 6.48]
    with pytest.raises(RanError, match="valid studies: noise, arl-nal, attention, mask"):
        get_study("table9")
    with pytest.raises(RanError, match="no cell 'r20-attention92'"):
        noise.cell("r20-attention92")


def test_cell_parameters_layer_profile_study_and_cell(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["noise"]["seed"] = 7
    params["studies"]["quick"]["train"]["iterations"] = 123
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cell = get_study("noise").cell("r30-resnet164")
    noise, train, evaluate = cell_params(cell, "quick", path)
    assert isinstance(noise, NoiseParams) and (noise.kind, noise.rate, noise.seed) == (
        "symmetric",
        0.3,
        7,
    )
    assert isinstance(train, TrainParams)
    assert (train.family, train.depth, train.iterations) == ("resnet", 164, 123)  # cell, study
    assert train.width == params["quick"]["train"]["width"]  # the quick profile
    assert train.log_model is False  # a cell keeps model.pt in DVC's cache
    assert isinstance(evaluate, EvaluateParams) and evaluate.flip is True
    _, paper, _ = cell_params(cell, "paper", path)
    assert (paper.iterations, paper.width, paper.depth) == (None, 1.0, 164)


def test_vitmask_study_cells_read_their_data_set_and_prior(tmp_path: Path) -> None:
    """Rows are data sets, columns the mask strength (and an Attention-56 without a prior);
    the study's profile overlay (studies.vitmask.<profile>) sets the input size and length."""
    study = get_study("vitmask")
    assert [c.paper_error for c in study.cells] == [13.0, 13.4, 16.7, None, 56.6, 57.1, 58.9, None]
    assert cell_data(study.cell("cifar10-a0.5")) == (
        Path("data/ingest"),
        Path("data/prior/cifar10"),
    )
    assert cell_data(study.cell("cifar100-attention56")) == (Path("data/cifar100/ingest"), None)
    path = REPO / "params.yaml"
    _, quick, _ = cell_params(study.cell("cifar100-a0.5"), "quick", path, "vitmask")
    assert (quick.family, quick.depth, quick.mask_strength) == ("vitmask", 8, 0.5)
    assert (quick.optimizer, quick.lr, quick.weight_decay, quick.upsample) == (
        "adamw",
        1e-3,
        5e-4,
        None,
    )
    assert quick.min_side is None and quick.width == 1.0  # not the quick profile's A-56 ones
    _, paper, _ = cell_params(study.cell("cifar100-a0.5"), "paper", path, "vitmask")
    assert (paper.upsample, paper.iterations, paper.holdout) == (224, 35157, 5000)
    _, budget, _ = cell_params(study.cell("cifar10-attention56"), "paper", path, "vitmask")
    assert (budget.family, budget.depth, budget.iterations) == ("attention", 56, 35157)


def test_ordering_compares_the_columns_with_a_published_number(tmp_path: Path) -> None:
    """The Attention-56 column has no published number: it is shown, not judged."""
    study = get_study("vitmask")
    errors = {"a1": 20.0, "a0.5": 21.0, "a0": 22.0, "attention56": 10.0}
    results = {
        c.name: CellResult(errors[c.name.split("-", 1)[1]], "id", None)
        for c in study.cells
        if c.name.startswith("cifar10-")
    }
    results |= {c.name: CellResult(None, None, None) for c in study.cells if c.name not in results}
    assert ordering(study, results) == [True, None]
    results["cifar10-a0"] = CellResult(19.0, "id", None)
    assert ordering(study, results) == [False, None]
    table = markdown(study, results, "quick")
    assert "| CIFAR-10 | 20.00 | 13.00 | 21.00 | 13.40 | 19.00 | 16.70 | 10.00 | - |" in table


def _finished_evaluate(experiment: str, tags: dict, error: float) -> str:
    """A real MLflow run as a cell's evaluate stage leaves it (the report's input)."""
    import mlflow

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="evaluate", tags={"stage": "evaluate", **tags}) as run:
        mlflow.log_metric("top1_error_pct", error)
    return run.info.run_id


def test_report_shows_missing_cells_as_missing(tmp_path: Path) -> None:
    import mlflow

    from ran.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    study = get_study("mask")
    base = {"study": "mask", "study.profile": "quick"}
    _finished_evaluate("e", {**base, "study.cell": "attention56-encoder-decoder"}, 40.0)
    newest = _finished_evaluate("e", {**base, "study.cell": "attention56-encoder-decoder"}, 30.0)
    _finished_evaluate(
        "e", {**base, "study.profile": "paper", "study.cell": "attention56-local"}, 1
    )
    summary = write_report(study, "e", "quick", tmp_path / "out")
    assert summary["cells"]["attention56-encoder-decoder"]["top1_error_pct"] == 30.0
    assert summary["cells"]["attention56-encoder-decoder"]["run_id"] == newest
    assert summary["cells"]["attention56-local"]["top1_error_pct"] is None  # paper-profile run
    assert summary["missing_cells"] == 1 and summary["complete_rows"] == 0
    table = (tmp_path / "out/report.md").read_text()
    assert "| Attention-56 | 30.00 | 5.52 | missing | 6.48 | missing cells |" in table
    assert (
        f"/runs/{newest})" in table
        and "`attention56-local` (Attention-56, local convolutions): missing" in table
    )
    assert (tmp_path / "out/report.png").stat().st_size > 0
    declared = yaml.safe_load((tmp_path / "out/dvc.yaml").read_text())  # DVC's, once written
    assert declared == {"metrics": ["results.json"], "plots": ["report.png"]}

    _finished_evaluate("e", {**base, "study.cell": "attention56-local"}, 35.0)
    summary = write_report(study, "e", "quick", tmp_path / "out")
    assert summary["ordering_holds"] == 1 and summary["missing_cells"] == 0
    assert "| 30.00 | 5.52 | 35.00 | 6.48 | holds |" in (tmp_path / "out/report.md").read_text()


# A study cell in the tests: four steps of a width-0.25 network on 200 real CIFAR-10 images;
# exact noise, since 20 records per class cannot hit a sampled rate within 1 %.
TINY_STUDY = {"train": {"iterations": 4, "log_model": False}}


@pytest.mark.slow
def test_noise_study_runs_in_dvc_resumes_and_reports_every_cell(project: tuple) -> None:
    """All eight cells through ``dvc repro --keep-going``; a cell that fails (a corrupt
    checkpoint) does not stop the others, the report shows it missing, and the next run
    re-runs only that cell."""
    from mlflow import MlflowClient

    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["studies"]["quick"] = TINY_STUDY
    params["noise"]["exact"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    broken = repo / "data/studies/noise/r30-resnet164/train/checkpoint-last.pt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    dvc = [str(BIN / "dvc"), "repro", "--keep-going", "studies/dvc.yaml:noise"]
    first = subprocess.run(dvc, cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode != 0
    assert "r30-resnet164" in first.stderr and "checkpoint" in first.stderr
    run_ok([str(BIN / "python"), "-m", "ran.cli", "report", "noise"], repo, env)
    results = json.loads((repo / "reports/noise/results.json").read_text())
    assert results["missing_cells"] == 1
    assert results["cells"]["r30-resnet164"]["top1_error_pct"] is None
    assert results["cells"]["r10-attention92"]["top1_error_pct"] is not None

    broken.unlink()
    second = run_ok(dvc, repo, env)
    ran = [line for line in second.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == [
        "Running stage 'studies/dvc.yaml:noise-cell@r30-resnet164':",
        "Running stage 'studies/dvc.yaml:noise':",
    ]
    results = json.loads((repo / "reports/noise/results.json").read_text())
    assert results["missing_cells"] == 0 and results["complete_rows"] == 4
    table = (repo / "reports/noise/report.md").read_text()
    for cell in get_study("noise").cells:
        assert f"`{cell.name}` ({cell.row}, {cell.column}): [" in table
    assert "| 10% | " in table and " | 5.15 | " in table and " | 17.21 | " in table

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("residual-attention").experiment_id
    runs = client.search_runs(
        [experiment], "tags.study = 'noise' AND attributes.status = 'FINISHED'"
    )
    stages = {}
    for run in runs:
        stages.setdefault(run.data.tags["stage"], set()).add(run.data.tags.get("study.cell"))
    every = {c.name for c in get_study("noise").cells}
    assert stages["noise"] == stages["train"] == stages["evaluate"] == every
    train = next(
        r
        for r in runs
        if r.data.tags["stage"] == "train" and r.data.tags["study.cell"] == "r70-resnet164"
    )
    assert train.data.params["family"] == "resnet" and train.data.params["depth"] == "164"
    for run in (r for r in runs if "study.cell" in r.data.tags):  # the cells' runs say which
        note = run.data.tags["mlflow.note.content"]
        assert f"Study `noise`, cell `{run.data.tags['study.cell']}` (quick profile)" in note
    assert "Trains resnet164-cifar (" in train.data.tags["mlflow.note.content"]
    assert not client.search_logged_models([experiment])  # log_model false: none logged
    assert train.data.params["labels"].endswith("data/studies/noise/r70-resnet164/noise/labels.npy")


def test_report_of_an_unknown_study_is_one_line_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ran.cli import app

    result = CliRunner().invoke(app, ["report", "table9", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown study 'table9'; valid studies: noise, arl-nal, attention, mask, vitmask"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_vitmask_cell_runs_in_dvc_after_its_prior_stages(project: tuple, tmp_path: Path) -> None:
    """``dvc repro`` of one vitmask cell runs what it needs and no more: CIFAR-10's ingest
    and ``prior`` stage (the quick profile's random ViT at 32 px), then the cell, trained and
    evaluated with the CIFAR-10 maps; then the CIFAR-100 baseline cell, after its own ingest
    (from $RAN_CIFAR100_SOURCE) alone."""
    from conftest import write_cifar_python
    from mlflow import MlflowClient

    repo, env = project
    env = {**env, "RAN_CIFAR100_SOURCE": str(write_cifar_python(tmp_path, "cifar100", 2))}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["studies"]["quick"] = TINY_STUDY
    params["studies"]["vitmask"]["quick"]["train"] |= {"holdout": 0, "batch_size": 20}
    params["studies"]["vitmask"]["quick"]["train"]["iterations"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [str(BIN / "dvc"), "repro", "studies/dvc.yaml:vitmask-cell@cifar10-a0.5"]
    ran = [line for line in run_ok(dvc, repo, env).stdout.splitlines() if "Running" in line]
    assert ran == [
        "Running stage 'ingest':",
        "Running stage 'studies/dvc.yaml:prior@cifar10':",
        "Running stage 'studies/dvc.yaml:vitmask-cell@cifar10-a0.5':",
    ]
    import numpy as np

    assert np.load(repo / "data/prior/cifar10/train.npy").shape == (200, 4, 4)
    assert np.load(repo / "data/prior/cifar10/val.npy").shape == (50, 4, 4)
    cell = repo / "data/studies/vitmask/cifar10-a0.5"
    assert json.loads((cell / "evaluate/metrics.json").read_text())["test_records"] == 50

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("residual-attention").experiment_id
    runs = client.search_runs([experiment], "attributes.status = 'FINISHED'")
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert {r.data.params["init"] for r in by_stage["prior"]} == {"random"}
    (train,) = by_stage["train"]
    assert (train.data.params["family"], train.data.params["mask_strength"]) == ("vitmask", "0.5")
    assert train.data.params["prior"] == "data/prior/cifar10"
    assert train.data.tags["study.cell"] == "cifar10-a0.5"

    dvc = [str(BIN / "dvc"), "repro", "studies/dvc.yaml:vitmask-baseline@cifar100"]
    ran = [line for line in run_ok(dvc, repo, env).stdout.splitlines() if "Running" in line]
    assert ran == [
        "Running stage 'studies/dvc.yaml:ingest-cifar100':",
        "Running stage 'studies/dvc.yaml:vitmask-baseline@cifar100':",
    ]
    assert not (repo / "data/prior/cifar100").exists()
    cell = repo / "data/studies/vitmask/cifar100-attention56/evaluate/metrics.json"
    assert json.loads(cell.read_text())["test_records"] == 200
