"""Shared fixtures: real images from ../shared/data, and small data sets built from them."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from ran.data.sources import SAFE_EXTRACTION

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment the tests run in (.venv/bin)
SHARED_DATA = Path(os.environ.get("RAN_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample.tar.gz"


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own MLflow store and download cache, never the repo's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "False")
    monkeypatch.delenv("RAN_INGEST_SOURCE", raising=False)


def _extract(archive: Path, target: Path) -> Path:
    if not archive.is_file():
        pytest.fail(f"real test data missing: {archive} (set RAN_SHARED_DATA)")
    with tarfile.open(archive) as tar:
        tar.extractall(target, **SAFE_EXTRACTION)
    return target


@pytest.fixture(scope="session")
def cifar10_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIFAR-10 as JPEG: cifar10-jpeg/{train,test}/<class>/*.jpg."""
    return _extract(CIFAR10_JPEG, tmp_path_factory.mktemp("cifar10")) / "cifar10-jpeg"


@pytest.fixture(scope="session")
def cifar10_small(cifar10_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-image subset: 20 train and 5 test images per class (train/ + test/)."""
    root = tmp_path_factory.mktemp("cifar10-small") / "cifar10-small"
    for split, count in (("train", 20), ("test", 5)):
        for cls in sorted((cifar10_tree / split).iterdir()):
            (root / split / cls.name).mkdir(parents=True)
            for image in sorted(cls.iterdir())[:count]:
                shutil.copy(image, root / split / cls.name / image.name)
    return root


@pytest.fixture
def small_tree(cifar10_small: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``cifar10_small`` for tests that damage it."""
    return Path(shutil.copytree(cifar10_small, tmp_path / "tree"))


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ImageNet sample in ImageNet's full layout.

    train/<wnid>/*.JPEG and LOC_synset_mapping.txt as shipped; val/ in ImageNet's flat val
    layout with LOC_val_solution.csv, holding the mirror image of each train image (real
    pixels, not duplicates of train).
    """
    from PIL import Image, ImageOps

    root = _extract(IMAGENET_SAMPLE, tmp_path_factory.mktemp("imagenet")) / "imagenet-sample"
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for n, image in enumerate(sorted(root.glob("train/*/*.JPEG")), start=1):
        image_id = f"ILSVRC2012_val_{n:08d}"
        with Image.open(image) as img:
            ImageOps.mirror(img.convert("RGB")).save(root / "val" / f"{image_id}.JPEG", quality=90)
        rows.append(f"{image_id},{image.parent.name} 0 0 10 10")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def write_cifar_python(target: Path, dataset: str, per_class: int, seed: int = 0) -> Path:
    """A tiny archive in the official CIFAR python format (pickled dicts, row-major planes)."""
    rng = np.random.default_rng(seed)
    if dataset == "cifar10":
        folder, classes, label_key = "cifar-10-batches-py", 10, "labels"
        files = {f"data_batch_{i}": per_class for i in range(1, 6)} | {"test_batch": per_class}
        meta = ("batches.meta", {"label_names": [f"class{i}" for i in range(classes)]})
    else:
        folder, classes, label_key = "cifar-100-python", 100, "fine_labels"
        files = {"train": per_class, "test": per_class}
        meta = ("meta", {"fine_label_names": [f"class{i}" for i in range(classes)]})
    root = target / folder
    root.mkdir(parents=True)
    for name, count in files.items():
        labels = np.repeat(np.arange(classes), count)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        blob = {"data": data, label_key: labels.tolist(), "filenames": [f"{i}.png" for i in labels]}
        (root / name).write_bytes(pickle.dumps(blob))
    (root / meta[0]).write_bytes(pickle.dumps(meta[1]))
    archive = target / f"{folder.replace('-batches-py', '-python')}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=folder)
    return archive


@pytest.fixture(scope="session")
def small_ingest(cifar10_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cifar10_small`` (real images, 200 train / 50 test) ingested once, read-only."""
    from ran.config import IngestParams
    from ran.data.ingest import ingest

    out = tmp_path_factory.mktemp("small-ingest") / "ingest"
    ingest(IngestParams(dataset="cifar10", source=cifar10_small), out)
    return out


# A network small enough to take a few steps in seconds on 2 cores: width-0.25 Attention-56.
TINY_TRAIN = ["--depth", "56", "--width", "0.25", "--batch-size", "20", "--device", "cpu"]


def train_tiny(data: Path, folder: Path, *extra: str) -> Path:
    """A tiny network trained 30 steps on ``data`` (its predictions are not uniform), with
    ``extra`` train options: the ``ran-cli train`` output folder ``folder/train``; its MLflow
    store is ``folder``'s own, and no model is logged."""
    out = folder / "train"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    args = ["train", "--data", data, "--out", out, *TINY_TRAIN, "--iterations", "30", *extra]
    run_ok([sys.executable, "-m", "ran.cli", *map(str, args), "--no-log-model"], REPO, env)
    return out


@pytest.fixture(scope="session")
def trained_model(small_ingest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`train_tiny` on ``small_ingest``, read-only."""
    return train_tiny(small_ingest, tmp_path_factory.mktemp("trained"))


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """``condition()``'s first true value, polled until ``timeout`` seconds (else fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def kill_9_at_checkpoint(args: list[str], checkpoint: Path, progress: str, at: int) -> None:
    """Start ``args`` and SIGKILL it once ``checkpoint`` records ``progress`` (the counter
    its ``progress`` dict holds: iteration, step) of ``at`` or more."""
    import torch

    def reached() -> int:
        try:
            return torch.load(checkpoint, weights_only=True)["progress"][progress]
        except (FileNotFoundError, RuntimeError, EOFError):
            return 0

    process = subprocess.Popen(args)
    deadline = time.monotonic() + 300
    while reached() < at:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> list[str]:
    """The running processes of group ``pgid`` (zombies aside: an exited child that nobody
    reaps, where PID 1 does not, runs nothing and holds no port)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            if fields[0] != "Z" and int(fields[2]) == pgid:
                alive.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue  # gone meanwhile
    return alive


@contextmanager
def serving(
    args: list[str],
    url: str,
    log: Path,
    cwd: Path | None = None,
    env: dict | None = None,
    stops_cleanly: bool = False,
) -> Iterator[str]:
    """Run ``args`` (a server and its children, in their own process group) until ``url``
    answers /health; stop the whole group afterwards.

    ``stops_cleanly``: first send SIGTERM to the server alone (as ``kill PID`` or ``docker
    stop`` does), and fail unless it exits and takes all its children with it."""
    with open(log, "wb") as out:
        server = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{args[:3]} did not serve {url}:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
        if stops_cleanly:
            server.terminate()
            server.wait(timeout=60)
            deadline = time.monotonic() + 10  # multiprocessing's tracker sees the exit, ends
            while _group_alive(server.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = _group_alive(server.pid)
            assert not left, f"{args[:3]} left processes after SIGTERM: {left}"
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


# The quick profile, shrunk to a few steps of a width-0.25 network for the tests.
TINY_QUICK = {"width": 0.25, "iterations": 4, "batch_size": 20, "checkpoint_every": 2}
TINY_QUICK |= {"log_every": 2}


def run_ok(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_checkout(repo: Path) -> Path:
    """The files git tracks in this checkout, copied to ``repo`` (no data, no venv, no git)."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    return repo


@pytest.fixture
def project(tmp_path: Path, cifar10_small: Path, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """A fresh git + DVC checkout of this project, its ingest source set to real images."""
    repo = copy_checkout(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ingest"]["source"] = str(cifar10_small)
    params["quick"]["train"].update(TINY_QUICK)
    params["quick"]["evaluate"].update(masks=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".venv").symlink_to(BIN.parent)  # the README's set-up, done once for all tests
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the embedded default at the repo root
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for args in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        run_ok(args, repo, env)
    return repo, env
