"""Source readers: every layout ingestion accepts, and every bad input it must refuse."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cifar_python
from PIL import Image

from ran.data.sources import FileSplit, read_source
from ran.errors import RanError


def test_cifar10_python_archive_rows_are_rgb_planes(tmp_path: Path) -> None:
    archive = write_cifar_python(tmp_path, "cifar10", per_class=2)
    data = read_source("cifar10", archive, tmp_path / "work")
    assert data.classes == [f"class{i}" for i in range(10)]
    train, val = data.splits["train"], data.splits["val"]
    assert (len(train), len(val)) == (100, 20)
    with tarfile.open(archive) as tar:
        raw = pickle.loads(tar.extractfile("cifar-10-batches-py/data_batch_1").read())
    image = train.load(0)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    plane = np.asarray(raw["data"][0])
    assert (image[..., 0].ravel() == plane[:1024]).all()  # R plane first, row-major
    assert (image[..., 2].ravel() == plane[2048:]).all()
    assert train.labels[0] == raw["labels"][0]


def test_cifar100_python_folder_uses_fine_labels(tmp_path: Path) -> None:
    write_cifar_python(tmp_path, "cifar100", per_class=1)
    data = read_source("cifar100", tmp_path / "cifar-100-python", tmp_path / "work")
    assert len(data.classes) == 100
    assert sorted(set(data.splits["train"].labels.tolist())) == list(range(100))


def test_imagefolder_tree_real_images(cifar10_small: Path, tmp_path: Path) -> None:
    data = read_source("imagefolder", cifar10_small, tmp_path / "work")
    assert data.classes[:2] == ["airplane", "automobile"] and len(data.classes) == 10
    train, val = data.splits["train"], data.splits["val"]
    assert (len(train), len(val)) == (200, 50)
    assert train.name(0) == "train/airplane/0000.jpg"
    assert train.load(0).shape == (32, 32, 3)
    assert np.bincount(val.labels).tolist() == [5] * 10


def test_cifar10_tree_must_have_cifar10_classes(small_tree: Path, tmp_path: Path) -> None:
    (small_tree / "train" / "cat").rename(small_tree / "train" / "kitten")
    (small_tree / "test" / "cat").rename(small_tree / "test" / "kitten")
    with pytest.raises(RanError, match="not CIFAR-10's"):
        read_source("cifar10", small_tree, tmp_path / "work")


def test_imagenet_layout_with_val_solution_and_synsets(imagenet_tree: Path, tmp_path: Path) -> None:
    data = read_source("imagenet", imagenet_tree, tmp_path / "work")
    assert len(data.classes) == 100 and data.wnids[0] == "n01440764"
    assert data.classes[0] == "tench"
    val = data.splits["val"]
    assert len(val) == 100 and sorted(val.labels.tolist()) == list(range(100))
    first = val.files.index("ILSVRC2012_val_00000001.JPEG")
    assert val.labels[first] == 0


def test_tiny_imagenet_layout(cifar10_small: Path, tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(10)]
    annotations = []
    for wnid, cls in zip(wnids, sorted((cifar10_small / "train").iterdir()), strict=True):
        (root / "train" / wnid / "images").mkdir(parents=True)
        for image in sorted(cls.iterdir())[:3]:
            (root / "train" / wnid / "images" / f"{wnid}_{image.name}").write_bytes(
                image.read_bytes()
            )
        (root / "val" / "images").mkdir(parents=True, exist_ok=True)
        val_image = sorted((cifar10_small / "test" / cls.name).iterdir())[0]
        name = f"val_{wnid}.JPEG"
        (root / "val" / "images" / name).write_bytes(val_image.read_bytes())
        annotations.append(f"{name}\t{wnid}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    data = read_source("tiny-imagenet", root, tmp_path / "work")
    assert data.classes[3] == "thing 3" and data.wnids == wnids
    assert len(data.splits["train"]) == 30 and len(data.splits["val"]) == 10
    assert data.splits["val"].labels.tolist() == list(range(10))


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_any_image_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    converted = rgb.convert("L").convert(mode) if mode == "I;16" else rgb.convert(mode)
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    converted.save(path)
    image = FileSplit(tmp_path, [path.name], np.zeros(1, dtype=np.int64)).load(0)
    assert image.shape == (9, 7, 3) and image.dtype == np.uint8


def _tar_with_member(path: Path, name: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize("member", ["../escape.jpg", "/etc/evil.jpg", "train/../../x.jpg"])
def test_unsafe_archive_is_refused_before_extraction(tmp_path: Path, member: str) -> None:
    archive = _tar_with_member(tmp_path / "bad.tar.gz", member)
    with pytest.raises(RanError, match="unsafe archive"):
        read_source("imagefolder", archive, tmp_path / "work")
    assert not (tmp_path / "escape.jpg").exists()
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.jpg"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "has no train/ folder"),
        (lambda root: (root / "train" / "cls").mkdir(parents=True), "empty class folder"),
    ],
)
def test_bad_layouts(tmp_path: Path, damage, message: str) -> None:
    root = tmp_path / "data"
    damage(root)
    with pytest.raises(RanError, match=message):
        read_source("imagefolder", root, tmp_path / "work")


def test_missing_held_out_split(small_tree: Path, tmp_path: Path) -> None:
    import shutil

    shutil.rmtree(small_tree / "test")
    with pytest.raises(RanError, match="no held-out split"):
        read_source("imagefolder", small_tree, tmp_path / "work")


def test_held_out_class_unknown_to_train(small_tree: Path, tmp_path: Path) -> None:
    (small_tree / "test" / "cat").rename(small_tree / "test" / "lion")
    with pytest.raises(RanError, match="absent from train"):
        read_source("imagefolder", small_tree, tmp_path / "work")


def test_empty_class_in_held_out_split(small_tree: Path, tmp_path: Path) -> None:
    for image in (small_tree / "test" / "dog").iterdir():
        image.unlink()
    with pytest.raises(RanError, match="empty class folder"):
        read_source("imagefolder", small_tree, tmp_path / "work")


def test_download_without_network_fails_fast_with_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A closed local port stands in for "no network", whatever the machine has.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(RanError, match=r"cannot download cifar10.*RAN_INGEST_SOURCE"):
        read_source("cifar10", None, tmp_path / "work")
