"""The paper's studies: their grids, a cell's parameters, the report, and a whole study run
by DVC in a temporary repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BIN, REPO, run_ok

from ran.config import EvaluateParams, NoiseParams, TrainParams, study_seeds
from ran.errors import RanError
from ran.paths import ingest_folder, pretrain_folder, prior_folder
from ran.studies import STUDIES, get_study
from ran.studies import cell as study_cell
from ran.studies.cell import cell_data, cell_params, fingerprint, input_digests, seed_params
from ran.studies.report import CellResult, SeedRun, judge, markdown, write_report
from ran.studies.verdict import HOLDS, INCONCLUSIVE, REVERSED, compare, row_verdict


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
    (:func:`cell_data`); each data set's ViT is pretrained on that data set alone, its prior
    depends on that data set and that ViT, and the constant control on the data set alone."""
    stages = yaml.safe_load((REPO / "studies/dvc.yaml").read_text())["stages"]
    masked, baseline = stages["vitmask-cell"], stages["vitmask-baseline"]
    pretrain, prior, constant = stages["pretrain"], stages["prior"], stages["prior-constant"]
    assert masked["do"]["cmd"] == "python pipeline/study.py vitmask ${key}"
    assert masked["do"]["deps"][-2:] == ["${item.ingest}", "${item.prior}"]
    assert baseline["do"]["cmd"] == "python pipeline/study.py vitmask ${key}-attention56"
    assert baseline["do"]["deps"][-1] == pretrain["do"]["deps"][-1] == "${item}"
    assert constant["do"]["deps"][-1] == "${item}"
    assert prior["do"]["deps"][-2:] == ["${item.ingest}", "${item.vit}"]
    staged = {cell: (data["ingest"], data["prior"]) for cell, data in masked["foreach"].items()}
    staged |= {f"{name}-attention56": (data, None) for name, data in baseline["foreach"].items()}
    reads = {}
    for cell in get_study("vitmask").cells:
        data, cell_prior = cell_data(cell)
        reads[cell.name] = (str(data), cell_prior and str(cell_prior))
    assert staged == reads
    datasets = ("cifar10", "cifar100")
    ingests = {name: str(ingest_folder(name)) for name in datasets}
    assert baseline["foreach"] == pretrain["foreach"] == constant["foreach"] == ingests
    assert prior["foreach"] == {
        name: {"ingest": str(ingest_folder(name)), "vit": str(pretrain_folder(name))}
        for name in datasets
    }
    assert constant["do"]["outs"] == [str(prior_folder("${key}", constant=True))]


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
    # the quick stand-in for ResNet-164, and the studies' overlay
    assert (train.family, train.depth, train.iterations) == ("plain", 8, 123)
    assert train.batch_size == params["quick"]["train"]["batch_size"]  # the quick profile
    assert train.log_model is False  # a cell keeps model.pt in DVC's cache
    assert isinstance(evaluate, EvaluateParams) and evaluate.flip is True
    _, paper, _ = cell_params(cell, "paper", path)
    assert (paper.family, paper.iterations, paper.width, paper.depth) == ("resnet", None, 1.0, 164)
    _, bottleneck, _ = cell_params(get_study("arl-nal").cell("attention92-nal"), "quick", path)
    assert (bottleneck.depth, bottleneck.width, bottleneck.learning) == (92, 0.5, "nal")


def test_vitmask_study_cells_read_their_data_set_and_prior(tmp_path: Path) -> None:
    """Rows are data sets, columns the mask strength (and an Attention-56 without a prior);
    the study's profile overlay (studies.vitmask.<profile>) sets the input size and length."""
    study = get_study("vitmask")
    paper = [13.0, 13.4, 16.7, None, None, 56.6, 57.1, 58.9, None, None]
    assert [c.paper_error for c in study.cells] == paper
    assert cell_data(study.cell("cifar10-a0.5")) == (
        Path("data/ingest"),
        Path("data/prior/cifar10"),
    )
    # the control: a = 1 on the constant map of the same data set
    control = study.cell("cifar100-a1-constant")
    constant = Path("data/prior/cifar100-constant")
    assert cell_data(control) == (Path("data/cifar100/ingest"), constant)
    assert control.setting["train"] == study.cell("cifar100-a1").setting["train"]
    assert [(a.name, b.name) for a, b in study.control_cells()] == [
        ("cifar10-a1", "cifar10-a1-constant"),
        ("cifar100-a1", "cifar100-a1-constant"),
    ]
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


def _seed(seed: int, wrong: int, images: int = 2000) -> SeedRun:
    """A seed's run that got its first ``wrong`` test images wrong."""
    import numpy as np

    index = np.arange(images)
    return SeedRun(seed, 100 * wrong / images, images, "id", "link", index, index >= wrong)


def test_verdicts_compare_the_columns_with_a_published_number() -> None:
    """The Attention-56 and control columns have no published number: they are shown, not
    judged against the paper's ordering."""
    study = get_study("vitmask")
    wrong = {"a1": 200, "a0.5": 400, "a0": 600, "a1-constant": 300, "attention56": 100}
    results = {
        c.name: CellResult((_seed(0, wrong[c.name.split("-", 1)[1]]),))
        for c in study.cells
        if c.name.startswith("cifar10-")
    }
    results |= {c.name: CellResult() for c in study.cells if c.name not in results}
    rows = judge(study, results)
    assert [row.verdict for row in rows] == [HOLDS, None]
    assert set(rows[0].comparisons) == {"cifar10-a0.5", "cifar10-a0"}
    gap = rows[0].comparisons["cifar10-a0"]
    assert gap is not None and gap.difference == pytest.approx(20.0) and gap.low > 15
    results["cifar10-a0"] = CellResult((_seed(0, 100), _seed(1, 140)))
    rows = judge(study, results)
    assert [row.verdict for row in rows] == [REVERSED, None]
    table = markdown(study, results, rows, "quick", 3)
    assert (
        "| CIFAR-10 | 10.00 ± 0.67 (n=1) | 13.00 | 20.00 ± 0.89 (n=1) | 13.40 | "
        "6.00 ± 1.41 (n=2) | 16.70 | 15.00 ± 0.80 (n=1) | - | 5.00 ± 0.49 (n=1) | - | reversed |"
    ) in table
    assert "| CIFAR-10 | a = 0 minus a = 1 | -4.00 | [" in table and "] | reversed |" in table
    assert "| CIFAR-100 | a = 0.5 minus a = 1 | missing | missing | missing |" in table


def test_control_verdict_is_one_line_with_its_spread() -> None:
    """The vitmask study's control, a = 1 on the ViT's maps against a = 1 on a constant map:
    one line with its verdict over the rows and, per row, both cells' mean ± sd over seeds
    and the bootstrap interval of the difference; missing until every row has both."""
    from ran.studies.report import judge_control, results_json

    study = get_study("vitmask")
    results = {c.name: CellResult() for c in study.cells}
    results["cifar10-a1"] = CellResult(tuple(_seed(k, w) for k, w in enumerate((200, 210, 190))))
    results["cifar10-a1-constant"] = CellResult(
        tuple(_seed(k, w) for k, w in enumerate((300, 310, 290)))
    )
    control = judge_control(study, results)
    assert control is not None and control.verdict is None  # CIFAR-100 is missing
    gap = control.rows["CIFAR-10"][2]
    assert gap is not None and gap.verdict == HOLDS and gap.difference == pytest.approx(5.0)
    table = markdown(study, results, judge(study, results), "quick", 3)
    (line,) = [line for line in table.splitlines() if "Control" in line]
    assert line.startswith(
        "**Control:** the ViT prior's information helps beyond the attention branch and its "
        "gates (a = 1 beats a = 1 on a constant map): **missing** (CIFAR-10: `cifar10-a1` "
        "10.00 ± 0.50 (n=3) vs `cifar10-a1-constant` 15.00 ± 0.50 (n=3), difference +5.00 ["
    )
    assert line.endswith("] holds; CIFAR-100: missing).")
    same = tuple(_seed(k, 1000) for k in range(3))
    results |= {"cifar100-a1": CellResult(same), "cifar100-a1-constant": CellResult(same)}
    control = judge_control(study, results)
    assert control is not None and control.verdict == INCONCLUSIVE  # one row cannot tell
    summary = results_json(study, results, judge(study, results), control)["control"]
    assert summary["verdict"] == INCONCLUSIVE
    assert summary["rows"]["CIFAR-100"]["comparison"]["verdict"] == INCONCLUSIVE
    assert summary["rows"]["CIFAR-10"]["control"] == "cifar10-a1-constant"
    rows = judge(study, results)
    assert "**inconclusive** (CIFAR-10: " in markdown(study, results, rows, "quick", 3, control)
    assert get_study("mask").control is None  # the paper's studies have none


def _cell(rng: Any, seeds: int, images: int, error: float, jitter: float) -> Any:
    """A cell's seeds × images right/wrong, each seed's error rate ``error`` plus a normal
    seed-to-seed jitter of standard deviation ``jitter``."""
    rates = error + jitter * rng.standard_normal(seeds)
    return rng.random((seeds, images)) >= rates[:, None]


def test_equal_cells_are_judged_inconclusive_at_about_the_stated_rate() -> None:
    """Two cells of the same error distribution: the 95 % interval should leave 0 out (a
    verdict other than inconclusive) in about 5 % of repetitions. With one seed (the test
    set's error alone) it does (10 of these 200); with three seeds whose spread matches the
    test set's error it is conservative (it counts their interaction twice): 3 of 200.
    Allowed: at most 10 % (5 % + 3.3 standard errors of 200 repetitions)."""
    import numpy as np

    rng = np.random.default_rng(7)
    for seeds, jitter in ((1, 0.0), (3, 0.02)):
        judged = [
            compare(_cell(rng, seeds, 400, 0.3, jitter), _cell(rng, seeds, 400, 0.3, jitter))
            for _ in range(200)
        ]
        rate = sum(c.verdict != INCONCLUSIVE for c in judged) / len(judged)
        assert rate <= 0.10, (seeds, rate)
        if seeds == 1:
            assert rate >= 0.01, rate  # not blind either: the nominal 5 %, about


def test_a_large_gap_holds_and_its_reverse_is_reversed() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    best, worse = _cell(rng, 3, 400, 0.2, 0.02), _cell(rng, 3, 400, 0.4, 0.02)
    held = compare(best, worse)
    assert held.verdict == HOLDS and 15 < held.difference < 25 and 0 < held.low < held.high
    assert compare(worse, best).verdict == REVERSED
    assert compare(best, best).verdict == INCONCLUSIVE
    assert compare(best, worse) == held  # seeded: the same numbers every time
    assert row_verdict([HOLDS, HOLDS]) == HOLDS
    assert row_verdict([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert row_verdict([INCONCLUSIVE, REVERSED, HOLDS]) == REVERSED


def test_study_seeds_are_validated_in_one_line(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    assert (
        study_seeds("paper", path=REPO / "params.yaml"),
        study_seeds("quick", REPO / "params.yaml"),
    ) == (1, 3)
    del params["studies"]["quick"]["seeds"]
    path.write_text(yaml.safe_dump(params))
    assert study_seeds("quick", path) == 1
    for bad in (0, "3", 1.5, True):
        params["studies"]["quick"]["seeds"] = bad
        path.write_text(yaml.safe_dump(params))
        with pytest.raises(RanError, match=r"^invalid parameters: studies\.quick\.seeds: "):
            study_seeds("quick", path)


def test_seed_k_offsets_the_train_and_noise_seeds() -> None:
    cell = get_study("noise").cell("r30-resnet164")
    noise, train, evaluate = cell_params(cell, "quick", REPO / "params.yaml")
    noise2, train2, evaluate2 = seed_params(cell, "quick", 2, REPO / "params.yaml")
    assert (noise2.seed, train2.seed) == (noise.seed + 2, train.seed + 2)
    assert noise2.model_copy(update={"seed": noise.seed}) == noise and evaluate2 == evaluate
    assert train2.model_copy(update={"seed": train.seed}) == train


def test_seeds_done_with_the_same_inputs_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Growing the count from 3 to 5 runs seeds 3 and 4; a seed whose fingerprint differs
    (made with other parameters) or that has no evaluate output runs again."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["studies"]["quick"]["seeds"] = 5
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    data = tmp_path / "ingest"
    data.mkdir()
    (data / "meta.json").write_text('{"splits": {}}')
    study = get_study("mask")
    cell = study.cell("attention56-local")
    out = tmp_path / "cell"
    inputs = input_digests(data, None)
    for seed in range(3):
        folder = out / f"seed-{seed}"
        (folder / "evaluate").mkdir(parents=True)
        (folder / "evaluate" / "metrics.json").write_text(json.dumps({"seed": seed}))
        done = fingerprint(seed_params(cell, "quick", seed, path, "mask"), inputs)
        (folder / "params.json").write_text(json.dumps(done))
    ran = []

    def fake_seed(params: tuple, data: Path, out: Path, experiment: str, tags: dict,
                  prior: Path | None = None) -> dict:  # fmt: skip
        ran.append((out.name, params[1].seed, tags["study.seed"], tags["study.cell"]))
        (out / "evaluate").mkdir(parents=True, exist_ok=True)
        (out / "evaluate" / "metrics.json").write_text("{}")
        return {"ran": out.name}

    monkeypatch.setattr(study_cell, "run_seed", fake_seed)
    results = study_cell.run_cell(study, cell, data, out, "e", "quick", path=path)
    assert ran == [("seed-3", 3, "3", cell.name), ("seed-4", 4, "4", cell.name)]
    assert results == [{"seed": 0}, {"seed": 1}, {"seed": 2}, {"ran": "seed-3"}, {"ran": "seed-4"}]
    assert json.loads((out / "seed-4" / "params.json").read_text())["train"]["seed"] == 4

    ran.clear()
    (out / "seed-1" / "params.json").write_text(json.dumps({"train": {"iterations": 1}}))
    (out / "seed-2" / "evaluate" / "metrics.json").unlink()
    study_cell.run_cell(study, cell, data, out, "e", "quick", path=path)
    assert [seed for seed, *_ in ran] == ["seed-1", "seed-2"]
    ran.clear()
    (data / "meta.json").write_text('{"splits": {"val": "other data"}}')
    study_cell.run_cell(study, cell, data, out, "e", "quick", path=path)
    assert len(ran) == 5  # other data: no seed is kept


def test_cluster_mirror_keeps_every_seeds_checkpoint(tmp_path: Path) -> None:
    """The cluster worker's checkpoint store (a local filesystem here, S3 on a cluster):
    every seed's checkpoint in a cell's output is mirrored, restored into a fresh output in
    the same place, and cleared once the cell is done."""
    import time

    from fsspec.implementations.local import LocalFileSystem

    from ran.cluster.worker import CheckpointStore

    store = CheckpointStore(LocalFileSystem(), str(tmp_path / "remote"))
    output, scratch = tmp_path / "work" / "cell", tmp_path / "scratch"
    scratch.mkdir()
    assert store.restore(output) is False
    with store.mirror(output, scratch):
        for seed in (0, 1):
            checkpoint = output / f"seed-{seed}" / "train" / "checkpoint-last.pt"
            checkpoint.parent.mkdir(parents=True)
            checkpoint.write_bytes(f"seed {seed}".encode())
            time.sleep(1.2)  # the mirror looks twice a second
    assert sorted(store.stored()) == [
        "seed-0/train/checkpoint-last.pt",
        "seed-1/train/checkpoint-last.pt",
    ]
    fresh = tmp_path / "retry" / "cell"
    assert store.restore(fresh) is True
    assert (fresh / "seed-1" / "train" / "checkpoint-last.pt").read_bytes() == b"seed 1"
    store.clear()
    assert store.stored() == {} and store.restore(tmp_path / "third") is False


def _finished_evaluate(experiment: str, tags: dict, wrong: int, images: int = 200) -> str:
    """A real MLflow run as a cell's evaluate stage leaves it (the report's input): its
    error, and its predictions.csv with the first ``wrong`` of ``images`` test images wrong."""
    import csv

    import mlflow

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="evaluate", tags={"stage": "evaluate", **tags}) as run:
        mlflow.log_metrics({"top1_error_pct": 100 * wrong / images, "test_records": images})
        predictions = Path(f"predictions-{run.info.run_id}") / "predictions.csv"
        predictions.parent.mkdir()
        with open(predictions, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "actual", "predicted"])
            for index in reversed(range(images)):  # the order a loader may score them in
                writer.writerow([index, "cat", "dog" if index < wrong else "cat"])
        mlflow.log_artifact(str(predictions))
    return run.info.run_id


def test_report_shows_mean_spread_and_verdicts_and_missing_cells_as_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per cell, the newest finished run of each seed the profile runs (quick: 0, 1, 2; a
    run without a seed tag is seed 0): their mean ± sd, or ± the binomial standard error
    with one seed; per row, the verdict once every compared cell is there."""
    import mlflow

    from ran.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns)
    mlflow.set_tracking_uri(tracking_uri())
    study = get_study("mask")
    params = REPO / "params.yaml"
    base = {"study": "mask", "study.profile": "quick", "study.cell": "attention56-encoder-decoder"}
    _finished_evaluate("e", base, 80)
    newest = _finished_evaluate("e", base, 60)
    seed1 = _finished_evaluate("e", {**base, "study.seed": "1"}, 64)
    _finished_evaluate("e", {**base, "study.seed": "3"}, 10)  # not a seed the profile runs
    local = {**base, "study.cell": "attention56-local"}
    _finished_evaluate("e", {**local, "study.profile": "paper"}, 2)
    summary = write_report(study, "e", "quick", tmp_path / "out", params)
    cell = summary["cells"]["attention56-encoder-decoder"]
    assert cell["top1_error_pct"] == 31.0 and cell["run_ids"] == [newest, seed1]
    assert (cell["seeds"], cell["spread"]) == (2, "sd")
    assert cell["top1_error_spread"] == pytest.approx(2**0.5)
    assert summary["cells"]["attention56-local"]["top1_error_pct"] is None  # paper-profile run
    assert summary["missing_cells"] == 1 and summary["complete_rows"] == 0
    assert summary["rows"]["Attention-56"] == {
        "verdict": None,
        "comparisons": {"attention56-local": None},
    }
    table = (tmp_path / "out/report.md").read_text()
    assert "| Attention-56 | 31.00 ± 1.41 (n=2) | 5.52 | missing | 6.48 | missing |" in table
    assert f"seed 0 [{newest}](" in table and f"seed 1 [{seed1}](" in table
    assert "`attention56-local` (Attention-56, local convolutions): missing" in table
    assert "paired bootstrap over seeds and test images: 2000 resamples" in table
    assert (tmp_path / "out/report.png").stat().st_size > 0
    declared = yaml.safe_load((tmp_path / "out/dvc.yaml").read_text())  # DVC's, once written
    assert declared == {"metrics": ["results.json"], "plots": ["report.png"]}

    _finished_evaluate("e", local, 90)
    summary = write_report(study, "e", "quick", tmp_path / "out", params)
    assert summary["ordering_holds"] == 1 and summary["missing_cells"] == 0
    assert summary["cells"]["attention56-local"]["spread"] == "binomial_se"
    judged = summary["rows"]["Attention-56"]["comparisons"]["attention56-local"]
    assert judged["difference"] == pytest.approx(14.0) and judged["verdict"] == "holds"
    assert 0 < judged["low"] < 14 < judged["high"]
    table = (tmp_path / "out/report.md").read_text()
    assert "| 31.00 ± 1.41 (n=2) | 5.52 | 45.00 ± 3.52 (n=1) | 6.48 | holds |" in table
    assert "holds in 1, is reversed in 0 and is inconclusive in 0 of 1 judged rows" in table


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
    broken = repo / "data/studies/noise/r30-resnet164/seed-0/train/checkpoint-last.pt"
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
        assert f"`{cell.name}` ({cell.row}, {cell.column}): seed 0 [" in table
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
    # the quick profile's stand-in for ResNet-164
    assert train.data.params["family"] == "plain" and train.data.params["depth"] == "8"
    for run in (r for r in runs if "study.cell" in r.data.tags):  # the cells' runs say which
        note = run.data.tags["mlflow.note.content"]
        cell = run.data.tags["study.cell"]
        assert f"Study `noise`, cell `{cell}` (quick profile, seed 0)" in note
    assert "Trains plain8-cifar (" in train.data.tags["mlflow.note.content"]
    assert not client.search_logged_models([experiment])  # log_model false: none logged
    labels = "data/studies/noise/r70-resnet164/seed-0/noise/labels.npy"
    assert train.data.params["labels"].endswith(labels)


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
def test_vitmask_cell_runs_in_dvc_after_its_prior_stages(project: tuple) -> None:
    """``dvc repro`` of one vitmask cell runs what it needs and no more: CIFAR-10's ingest,
    ``pretrain`` (DINO of the quick profile's ViT, shortened) and ``prior`` stage (that ViT's
    maps at 32 px), then the cell, trained and evaluated with the CIFAR-10 maps, and the
    report. (The baseline cells' data and the seeds kept are tested without DVC above.)"""
    from mlflow import MlflowClient

    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["studies"]["quick"] = TINY_STUDY
    params["studies"]["vitmask"]["quick"]["train"] |= {"holdout": 0, "batch_size": 20}
    params["studies"]["vitmask"]["quick"]["train"]["iterations"] = 4
    tiny_dino = {"epochs": 1, "batch_size": 50, "knn_every": 0, "out_dim": 64, "hidden_dim": 64}
    params["quick"]["pretrain"] |= tiny_dino
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [str(BIN / "dvc"), "repro", "studies/dvc.yaml:vitmask-cell@cifar10-a0.5"]
    ran = [line for line in run_ok(dvc, repo, env).stdout.splitlines() if "Running" in line]
    assert ran == [
        "Running stage 'ingest':",
        "Running stage 'studies/dvc.yaml:pretrain@cifar10':",
        "Running stage 'studies/dvc.yaml:prior@cifar10':",
        "Running stage 'studies/dvc.yaml:vitmask-cell@cifar10-a0.5':",
    ]
    import numpy as np

    assert np.load(repo / "data/prior/cifar10/train.npy").shape == (200, 4, 4)
    assert np.load(repo / "data/prior/cifar10/val.npy").shape == (50, 4, 4)
    cell = repo / "data/studies/vitmask/cifar10-a0.5"
    assert json.loads((cell / "seed-0/evaluate/metrics.json").read_text())["test_records"] == 50

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("residual-attention").experiment_id
    runs = client.search_runs([experiment], "attributes.status = 'FINISHED'")
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert {r.data.params["init"] for r in by_stage["prior"]} == {"trained"}
    (pretrain,) = by_stage["pretrain"]
    weights = "data/pretrain/cifar10/vit.safetensors"
    assert by_stage["prior"][0].data.params["vit_weights"] == weights
    assert "knn_top1_random" in pretrain.data.metrics
    (train,) = by_stage["train"]
    assert (train.data.params["family"], train.data.params["mask_strength"]) == ("vitmask", "0.5")
    assert train.data.params["prior"] == "data/prior/cifar10"
    assert train.data.tags["study.cell"] == "cifar10-a0.5"

    run_ok([str(BIN / "python"), "-m", "ran.cli", "report", "vitmask"], repo, env)
    results = json.loads((repo / "reports/vitmask/results.json").read_text())["cells"]
    assert results["cifar10-a0.5"]["seeds"] == 1 and results["cifar10-a1"]["seeds"] == 0
