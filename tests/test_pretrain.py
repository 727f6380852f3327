"""``ran-cli pretrain``: DINO of the prior's ViT on real CIFAR-10 images, a ``kill -9`` and an
exact resume, bad input; the k-NN and the schedules. (``ran-cli prior`` loading its file is
the vitmask study's DVC test: tests/test_studies.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_9_at_checkpoint

from ran.config import PretrainParams

CLI = [sys.executable, "-m", "ran.cli"]
VIT = "ran_vit_tiny6_patch8_32"
# 200 train images at batch 50: 4 steps an epoch, 12 in all; every random draw exercised
# (views, stochastic depth), the head's last layer frozen for the first epoch, its batch norm's
# statistics carried across the kill.
TINY = [
    *("--vit", VIT, "--size", "32", "--local-size", "16", "--local-views", "2", "--no-blur"),
    *("--out-dim", "64", "--hidden-dim", "64", "--bottleneck-dim", "32", "--head-batch-norm"),
    *("--batch-size", "50"),
    *("--epochs", "3", "--warmup-epochs", "1", "--teacher-temp-epochs", "1"),
    *("--drop-path", "0.1", "--clip-grad", "3", "--checkpoint-every", "2", "--log-every", "2"),
    *("--device", "cpu"),
]


def _cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_kill_9_then_resume_is_exact(small_ingest: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ran.tracking import tracking_uri

    common = [*TINY, "--data", small_ingest]
    _cli("pretrain", *common, "--out", tmp_path / "whole")

    killed = tmp_path / "killed"
    args = [*CLI, "pretrain", *map(str, common), "--out", str(killed)]
    kill_9_at_checkpoint(args, killed / "checkpoint-last.pt", "step", 6)
    assert not (killed / "vit.safetensors").exists()  # nothing but the checkpoint yet
    _cli("pretrain", *common, "--out", killed, "--resume")

    whole, resumed = (
        load_file(tmp_path / "whole/vit.safetensors"),
        load_file(killed / "vit.safetensors"),
    )
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    with safe_open(killed / "vit.safetensors", "pt") as f:
        assert f.metadata()["timm_name"] == VIT

    report = json.loads((killed / "report.json").read_text())
    assert report["steps"] == 12 and report["epochs"] == 3
    for key in ("knn_top1", "knn_top1_random"):
        assert 0 <= report[key] <= 100
    assert 0 < report["map_mean_normalised_entropy"] <= 1
    assert report == {
        **json.loads((tmp_path / "whole/report.json").read_text()),
        "minutes": report["minutes"],
    }
    knn = (killed / "knn.csv").read_text().splitlines()
    assert knn[1].startswith("0,") and knn[-1].startswith("12,")  # random, then trained
    for figure in ("knn.png", "maps.png"):
        assert (killed / figure).read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri())  # the test's store, whatever an earlier test set
    runs = client.search_runs(
        [client.get_experiment_by_name("residual-attention").experiment_id],
        "tags.stage = 'pretrain'",
    )
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    continued = runs[0]  # newest first: the killed run, which --resume continued
    steps = [m.step for m in client.get_metric_history(continued.info.run_id, "loss")]
    assert steps == [2, 4, 6, 8, 10, 12]
    temps = [m.value for m in client.get_metric_history(continued.info.run_id, "teacher_temp")]
    assert temps[0] < temps[-1] == pytest.approx(0.07)
    artifacts = {a.path for a in client.list_artifacts(continued.info.run_id)}
    assert {"vit.safetensors", "report.json", "curves.csv", "knn.csv", "maps.png"} <= artifacts
    assert "knn_top1_random" in continued.data.metrics


def test_a_batch_larger_than_the_data_is_one_line(small_ingest: Path, tmp_path: Path) -> None:
    out = tmp_path / "pre"
    result = _cli(
        "pretrain", *TINY, "--data", small_ingest, "--out", out, "--batch-size", 500, check=False
    )
    assert result.returncode == 1
    assert "--batch-size 500 is larger than the 200 train images" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_knn_votes_by_weighted_neighbours() -> None:
    from ran.pretrain.knn import knn_top1

    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    labels = torch.arange(4).repeat_interleave(25)
    train = torch.nn.functional.normalize(centres[labels] + 0.05 * torch.randn(100, 16), dim=1)
    test = torch.nn.functional.normalize(centres[labels] + 0.05 * torch.randn(100, 16), dim=1)
    assert knn_top1(train, labels, test, labels, 20, 0.07, 4, chunk=33) == 100.0
    shuffled = labels[torch.randperm(100)]
    assert knn_top1(train, shuffled, test, labels, 20, 0.07, 4) < 60


def test_schedules_follow_dino() -> None:
    from ran.pretrain.dino import schedule

    p = PretrainParams(batch_size=512, epochs=10, warmup_epochs=2, teacher_temp_epochs=4)
    first, peak, last = (schedule(p, s, 100, 1000) for s in (0, 200, 999))
    assert first.lr == 0 and peak.lr == pytest.approx(5e-4 * 2) and last.lr < 1e-5
    assert first.teacher_temp == 0.04 and schedule(p, 200, 100, 1000).teacher_temp == pytest.approx(
        0.055
    )
    assert schedule(p, 400, 100, 1000).teacher_temp == 0.07
    assert first.momentum == 0.996 and last.momentum > 0.99999
    assert first.weight_decay == pytest.approx(0.04) and last.weight_decay == pytest.approx(
        0.4, abs=1e-4
    )
    assert first.freeze_last_layer and not schedule(p, 100, 100, 1000).freeze_last_layer


def test_knn_features_keep_every_batchs_labels(small_ingest: Path) -> None:
    """FFCV reuses its batch buffers: the labels kept must be copies (else every batch's
    labels read as the last one's, and the k-NN scores against the wrong classes)."""
    from ran.data.meta import read_meta
    from ran.pretrain.knn import features
    from ran.prior.vit import load_vit
    from ran.progress import progress_bar

    meta = read_meta(small_ingest)
    vit = load_vit(VIT, None, 32, random_init=True)
    with progress_bar() as bar:
        found, labels, maps = features(vit, small_ingest, "val", meta, 32, 16, bar)
    assert found.shape == (50, 192) and maps.shape == (50, 4, 4)
    assert labels.bincount().tolist() == [5] * 10
    assert torch.allclose(found.norm(dim=1), torch.ones(50))
