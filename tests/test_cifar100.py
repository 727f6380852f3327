"""The real CIFAR-100 (official python archive): ingest, train on 100 classes, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, TINY_TRAIN

pytestmark = pytest.mark.slow
CIFAR100 = SHARED_DATA / "cifar-100-python.tar.gz"


def test_cifar100_ingest_train_evaluate(tmp_path: Path) -> None:
    if not CIFAR100.is_file():
        pytest.fail(f"real test data missing: {CIFAR100} (set RAN_SHARED_DATA)")
    cli = [sys.executable, "-m", "ran.cli"]
    data, out = tmp_path / "cifar100", tmp_path / "train"
    steps = [
        ["ingest", "--dataset", "cifar100", "--source", CIFAR100, "--out", data],
        ["train", "--data", data, "--out", out, *TINY_TRAIN, "--iterations", "3"],
        ["evaluate", "--model", out / "model.pt", "--data", data, "--out", tmp_path / "eval"],
    ]
    for args in steps:
        result = subprocess.run([*cli, *map(str, args)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((data / "meta.json").read_text())
    assert meta["num_classes"] == 100 and meta["splits"]["train"]["count"] == 50_000
    assert meta["classes"][:3] == ["apple", "aquarium_fish", "baby"]
    record = torch.load(out / "model.pt", weights_only=True)
    assert record["arch"]["num_classes"] == 100
    assert record["state_dict"]["fc.weight"].shape[0] == 100
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["test_records"] == 10_000
    per_class = json.loads((tmp_path / "eval" / "per_class.json").read_text())
    assert len(per_class) == 100
