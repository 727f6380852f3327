"""``ran-cli`` as a user meets it: help, lazy imports, one-line errors, a real ingest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ran.cli"]
HEAVY = ("torch", "mlflow", "ffcv", "great_expectations", "numpy", "pandas")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy()
    )


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from ran.cli import app; "
        "r = CliRunner().invoke(app, ['ingest', '--help']); assert r.exit_code == 0, r.output; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "command", ["ingest", "noise", "train", "evaluate", "report", "predict", "serve"]
)
def test_command_help_imports_nothing_heavy(command: str) -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from ran.cli import app; "
        f"r = CliRunner().invoke(app, [{command!r}, '--help']); assert r.exit_code == 0, r.output; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_train_help_lists_every_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    from ran.config import TrainParams

    monkeypatch.setenv("COLUMNS", "200")
    result = _cli("train", "--help")
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())
    for name in TrainParams.model_fields:
        assert "--" + name.replace("_", "-") in flat, name
    for option in ("--data", "--out", "--labels", "--resume", "--profile", "--experiment"):
        assert option in flat
    assert "the paper's recipe" in flat and "(default: 92)" in flat


@pytest.mark.parametrize("args", [["--help"], ["ingest", "--help"]])
def test_help_explains(args: list[str]) -> None:
    result = _cli(*args)
    assert result.returncode == 0
    assert "ingest" in result.stdout
    if "ingest" in args:
        for option in ("--dataset", "--source", "--out", "--skip-bad", "RAN_INGEST_SOURCE"):
            assert option in result.stdout


def test_missing_source_is_one_line_error(tmp_path: Path) -> None:
    result = _cli("ingest", "--dataset", "imagefolder", "--source", str(tmp_path / "nope"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: source ")
    assert "does not exist" in lines[0] and "Traceback" not in result.stderr


def test_bad_option_value_is_one_line_error(tmp_path: Path) -> None:
    result = _cli("ingest", "--jpeg-quality", "101", "--source", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: invalid parameters: ingest.jpeg_quality: Input should be less than or equal to 100"
    )


def test_environment_variable_points_at_source(cifar10_small: Path, tmp_path: Path) -> None:
    os.environ["RAN_INGEST_SOURCE"] = str(cifar10_small)
    try:
        result = _cli("ingest", "--dataset", "cifar10", "--out", str(tmp_path / "out"))
    finally:
        del os.environ["RAN_INGEST_SOURCE"]
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["counts"] == {"train": 200, "val": 50}


@pytest.mark.slow
def test_real_cifar10_archive(tmp_path: Path) -> None:
    """The whole real CIFAR-10 JPEG archive: ingest, then the noise stage on it."""
    from conftest import CIFAR10_JPEG
    from mlflow import MlflowClient

    out = tmp_path / "out"
    args = ["ingest", "--dataset", "imagefolder", "--source", str(CIFAR10_JPEG), "--out", str(out)]
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["count"] == 50_000 and meta["splits"]["val"]["count"] == 10_000
    assert meta["num_classes"] == 10
    assert meta["mean"] == pytest.approx([125.3, 122.9, 113.9], abs=0.2)  # CIFAR-10's known mean
    assert json.loads((out / "validation.json").read_text())["success"] is True
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("residual-attention").experiment_id])
    assert [r.data.metrics["train_count"] for r in runs] == [50_000]
    # The noise stage on it: the real 50,000 labels, sampled at the requested rate.
    noise = tmp_path / "noise"
    result = _cli("noise", "--data", str(out), "--out", str(noise), "--kind", "symmetric",
                  "--rate", "0.5")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((noise / "report.json").read_text())
    assert report["records"] == 50_000 and report["achieved_rate"] == pytest.approx(0.5, abs=0.01)
    assert [row["records"] for row in report["per_class"]] == [5000] * 10


@pytest.mark.slow
def test_real_imagenet_sample(imagenet_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _cli(
        "ingest", "--dataset", "imagenet", "--source", str(imagenet_tree), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_classes"] == 100 and len(meta["wnids"]) == 100
    assert meta["splits"]["train"]["count"] == 100 and meta["ffcv"]["write_mode"] == "proportion"
    assert meta["ffcv"]["max_resolution"] == 500 and meta["ffcv"]["jpeg_quality"] == 90
