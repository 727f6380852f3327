"""Training and evaluation on real CIFAR-10 images, as a user runs them: ``ran-cli train``,
``ran-cli evaluate``, a ``kill -9`` and ``--resume``, bad input, and the MLflow record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TRAIN, kill_9_at_checkpoint

from ran.train.lookahead import Lookahead
from ran.train.recipe import linear_factor

CLI = [sys.executable, "-m", "ran.cli"]
pytestmark = pytest.mark.slow


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _refused(*args: object) -> str:
    """A command that must stop before any work, run in-process (the same error path as the
    command line, without a new interpreter): its one-line error."""
    from typer.testing import CliRunner

    from ran.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _client():
    from mlflow import MlflowClient

    from ran.tracking import tracking_uri

    return MlflowClient(tracking_uri())  # the store built under ran's lock, as the CLI's


def _runs(name: str) -> list:
    client = _client()
    experiment = client.get_experiment_by_name("residual-attention")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    return [r for r in runs if r.info.run_name == name]


def test_train_then_evaluate(
    small_ingest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow samples system metrics every 10 s: sample each second, so a short run has some.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    out, scored = tmp_path / "train", tmp_path / "eval"
    args = ["train", "--data", small_ingest, "--out", out, *TINY_TRAIN, "--iterations", "8"]
    _cli(*args, "--holdout", "50", "--eval-every", "4", "--log-every", "2")
    assert {p.name for p in out.iterdir()} >= {
        "checkpoint-last.pt", "model.pt", "model-best.pt", "curves.csv", "holdout.csv",
        "summary.json",
    }  # fmt: skip
    record = torch.load(out / "model.pt", weights_only=True)
    assert record["arch"]["variant"] == "attention56-cifar" and record["arch"]["num_classes"] == 10
    assert record["classes"][0] == "airplane" and record["input_size"] == 32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 8 and 0 <= summary["best_holdout_accuracy"] <= 1

    (run,) = _runs("train")
    assert run.info.status == "FINISHED" and run.info.run_id == summary["run_id"]
    assert run.data.params["depth"] == "56" and run.data.params["variant"] == "attention56-cifar"
    history = _client().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6, 8]
    assert {"train_accuracy", "lr", "images_per_s", "holdout_accuracy"} <= set(run.data.metrics)
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics
    assert run.data.tags["stage"] == "train"
    versions = _client().search_model_versions("name='cifar10-attention56'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id

    result = _cli("evaluate", "--model", out / "model.pt", "--data", small_ingest, "--out", scored)
    metrics = json.loads((scored / "metrics.json").read_text())
    assert json.loads(result.stdout) == metrics
    assert metrics["test_records"] == 50 and 0 <= metrics["top1_accuracy"] <= 1
    assert metrics["top1_accuracy"] <= metrics["top5_accuracy"]
    assert metrics["top1_error_pct"] == pytest.approx(100 * (1 - metrics["top1_accuracy"]))
    confusion = json.loads((scored / "confusion.json").read_text())
    matrix = np.array(confusion["matrix"])
    assert matrix.sum() == 50 and np.trace(matrix) / 50 == pytest.approx(metrics["top1_accuracy"])
    rows = (scored / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,actual,predicted" and len(rows) == 51
    assert len(list((scored / "masks").glob("*.png"))) == 8
    (evaluation,) = _runs("evaluate")
    assert evaluation.data.tags["train_run_id"] == run.info.run_id
    assert evaluation.data.metrics["top1_accuracy"] == pytest.approx(metrics["top1_accuracy"])
    artifacts = {a.path for a in _client().list_artifacts(evaluation.info.run_id)}
    assert {"metrics.json", "confusion.png", "masks"} <= artifacts


def test_registered_model_predicts_without_pickle(
    small_ingest: Path, cifar10_small: Path, tmp_path: Path
) -> None:
    """The registry's model loads in a fresh process with MLflow's pickle refusal on, takes
    real JPEG bytes, and answers what model.pt's predictor answers for those files. Its
    input example is the first test record as PNG bytes, and the scoring form MLflow keeps
    of it (``serving_input_example.json``) predicts through MLflow's own scoring path."""
    from ran.inference.images import read_image
    from ran.inference.predictor import Predictor

    out = tmp_path / "train"
    _cli("train", "--data", small_ingest, "--out", out, *TINY_TRAIN, "--iterations", "2")
    files = sorted((cifar10_small / "test" / "ship").iterdir())[:3]
    code = textwrap.dedent("""
        import base64, json, sys, mlflow
        uri = 'models:/cifar10-attention56/1'
        m = mlflow.pyfunc.load_model(uri)
        print(json.dumps(m.predict([open(f, 'rb').read() for f in sys.argv[3:]])))
        print(json.dumps([base64.b64decode(e).hex() for e in m.input_example]))
        local = mlflow.artifacts.download_artifacts(uri)
        with open(sys.argv[1], 'w') as f:
            f.write(mlflow.models.Model.load(local).get_serving_input(local))
        mlflow.models.predict(local, input_path=sys.argv[1], output_path=sys.argv[2],
                              env_manager='local')
    """)
    served = [tmp_path / "serving_input.json", tmp_path / "served.json"]
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, served + files)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers, examples = map(json.loads, done.stdout.strip().splitlines()[-2:])
    predictor = Predictor.from_model_file(out / "model.pt")
    expected = predictor.predict_bytes([f.read_bytes() for f in files])
    assert [a["labels"] for a in answers] == [e["labels"] for e in expected]
    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(answer["probs"], want["probs"], rtol=1e-5)
    example = bytes.fromhex(examples[0])  # the first test image's pixels, as PNG
    manifest = pd.read_parquet(small_ingest / "manifest.parquet").query("split == 'val'")
    first = cifar10_small / manifest.loc[manifest["index"] == 0, "source"].item()
    assert len(examples) == 1 and example.startswith(b"\x89PNG")
    np.testing.assert_array_equal(read_image(example, "example"), read_image(first, "first"))
    (scored,) = json.loads(served[1].read_text())["predictions"]
    (want,) = predictor.predict_bytes([example])
    assert scored["labels"] == want["labels"]
    np.testing.assert_allclose(scored["probs"], want["probs"], rtol=1e-5)


def test_kill_9_then_resume_is_bit_identical(small_ingest: Path, tmp_path: Path) -> None:
    """The quick profile's recipe (whitened stem, lookahead, BN groups, bf16 where the CPU
    has it), stopped by SIGKILL and resumed, gives the uninterrupted run's weights."""
    quick = ["--profile", "quick", "--width", "0.25", "--batch-size", "20", "--device", "cpu"]
    common = [*quick, "--iterations", "16", "--warmup", "4", "--checkpoint-every", "3"]
    common += ["--log-every", "2"]
    common += ["--data", small_ingest, "--mixup", "0.2", "--random-erasing", "0.5"]
    _cli("train", *common, "--out", tmp_path / "whole")

    killed = tmp_path / "killed"
    args = [*CLI, "train", *map(str, common), "--out", str(killed)]
    kill_9_at_checkpoint(args, killed / "checkpoint-last.pt", "iteration", 6)
    assert not (killed / "model.pt").exists()
    first = _runs("train")[-1]
    assert first.info.status == "RUNNING"

    _cli("train", *common, "--out", killed, "--resume")
    whole, resumed = _weights(tmp_path / "whole" / "model.pt"), _weights(killed / "model.pt")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name

    runs = _runs("train")
    assert len(runs) == 2  # the uninterrupted run, and the killed run continued
    continued = _client().get_run(first.info.run_id)
    assert continued.info.status == "FINISHED"
    steps = [m.step for m in _client().get_metric_history(first.info.run_id, "loss")]
    assert steps[0] == 2 and steps[-1] == 16
    assert not [p for p in killed.iterdir() if ".tmp-" in p.name]


def test_second_run_into_the_same_folder_is_refused(small_ingest: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    args = [*TINY_TRAIN, "--iterations", "400", "--data", small_ingest, "--out", out]
    first = subprocess.Popen([*CLI, "train", *map(str, args)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / ".train.lock").exists() or not _runs("train"):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        second = _cli("train", *args, check=False)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"error: {out} is in use by another run (pid {first.pid}); wait for it or stop it "
            f"(kill {first.pid})"
        ]
    finally:
        first.kill()
        first.wait()
    third = _cli("train", *args[:-4], "--iterations", "2", "--data", small_ingest, "--out", out)
    assert third.returncode == 0
    statuses = sorted(r.info.status for r in _runs("train"))
    assert statuses == ["FINISHED", "KILLED"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--depth", "93"], "unknown depth 93 for attention (cifar); valid depths: 8, 56, 92, 128"),
        (["--attention", "soft"], "train.attention: Input should be 'mixed', 'channel' or"),
        (["--resume"], "does not exist; start afresh without --resume"),
        (["--batch-size", "1000"], "larger than the 200 training records"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    small_ingest: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "train"
    assert message in _refused("train", "--data", small_ingest, "--out", out, *TINY_TRAIN, *args)
    assert not out.exists() or not any(out.iterdir())


def test_a_family_without_depth_takes_its_usual_one(small_ingest: Path, tmp_path: Path) -> None:
    """``--family`` alone picks the family's depth (ResNet-8 for vitmask, ResNet-164), so
    what is refused is the real problem, not the attention family's default depth 92."""
    from ran.config import TrainParams

    assert [TrainParams(family=f).depth for f in ("attention", "resnet", "vitmask")] == [92, 164, 8]
    assert TrainParams(family="resnet", depth=20).depth == 20
    out = tmp_path / "t"
    refused = _refused("train", "--data", small_ingest, "--out", out, "--family", "vitmask")
    assert refused.startswith("error: --family vitmask needs the ViT attention prior")


def test_bad_checkpoints_and_labels(small_ingest: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    base = ["train", "--data", small_ingest, "--out", out, *TINY_TRAIN, "--iterations", "2"]
    _cli(*base)
    assert "is of another network (attention56-cifar" in _refused(
        *base, "--depth", "92", "--resume"
    )
    data = (out / "checkpoint-last.pt").read_bytes()
    (out / "checkpoint-last.pt").write_bytes(data[: len(data) // 2])
    assert "unreadable" in _refused(*base, "--resume")

    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(199, dtype=np.int64))
    assert "has 199 labels but the train split has 200" in _refused(*base, "--labels", labels)


def test_labels_file_replaces_the_training_labels(small_ingest: Path, tmp_path: Path) -> None:
    """Every record relabelled 3: the network learns to answer 3 (labels read by index)."""
    labels = tmp_path / "labels.npy"
    np.save(labels, np.full(200, 3, dtype=np.int64))
    out = tmp_path / "train"
    args = ["--iterations", "20", "--log-every", "10", "--lr", "0.05", "--labels", labels]
    _cli("train", "--data", small_ingest, "--out", out, *TINY_TRAIN, *args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_train_accuracy"] > 0.9


def test_nan_loss_stops_with_the_last_good_checkpoint(small_ingest: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    args = [*TINY_TRAIN, "--iterations", "30", "--checkpoint-every", "1", "--lr", "1e12"]
    result = _cli("train", "--data", small_ingest, "--out", out, *args, check=False)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: the loss became") and "checkpoint" in line
    state = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "model.pt").exists()
    assert _runs("train")[-1].info.status == "FAILED"


def test_imagenet_size_data_takes_the_imagenet_variant(imagenet_tree: Path, tmp_path: Path) -> None:
    """Real ImageNet images (variable sizes): random-resized crops at 224 px, the ImageNet
    network, and evaluation at another test size (centre crop)."""
    data, out, scored = tmp_path / "imagenet", tmp_path / "train", tmp_path / "eval"
    _cli("ingest", "--dataset", "imagenet", "--source", imagenet_tree, "--out", data)
    args = ["--depth", "56", "--width", "0.25", "--batch-size", "4", "--device", "cpu"]
    _cli("train", "--data", data, "--out", out, *args, "--iterations", "2", "--register-model")
    record = torch.load(out / "model.pt", weights_only=True)
    assert record["arch"]["variant"] == "attention56-imagenet"
    assert record["input_size"] == 224 and record["small_images"] is False
    _cli("evaluate", "--model", out / "model.pt", "--data", data, "--out", scored)
    big = _cli(
        "evaluate", "--model", out / "model.pt", "--data", data, "--out", scored,
        "--image-size", "256", "--masks", "2",
    )  # fmt: skip
    metrics = json.loads(big.stdout)
    assert metrics["image_size"] == 256 and metrics["test_records"] == 100
    assert len(list((scored / "masks").glob("*.png"))) == 2


def test_linear_schedule_is_airbench94s() -> None:
    """0.2 -> 1 over the warm-up, then linearly down to 0.07 at the last iteration."""
    assert linear_factor(0, 10, 110) == pytest.approx(0.2)
    assert linear_factor(5, 10, 110) == pytest.approx(0.6)
    assert linear_factor(10, 10, 110) == pytest.approx(1.0)
    assert linear_factor(60, 10, 110) == pytest.approx(1 - 0.93 / 2)
    assert linear_factor(110, 10, 110) == pytest.approx(0.07)


def test_lookahead_pulls_the_weights_to_their_average() -> None:
    """Every 5th step the average moves (1 - decay) of the way to the weights and the
    weights jump to it; the last step leaves the weights at the average."""
    model = torch.nn.Linear(2, 2)
    start = model.weight.detach().clone()
    lookahead = Lookahead(model, total=10)
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after_step(4)
    assert torch.equal(model.weight, start + 1)
    lookahead.after_step(5)
    decay = 0.95**5 * 0.5**3
    assert torch.allclose(model.weight, start + (1 - decay))
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after_step(10)
    assert torch.allclose(model.weight, start + (1 - decay))
