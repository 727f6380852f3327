"""Ingestion end to end on real images: betons, meta.json, validation, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cifar_python
from PIL import Image

from ran.config import IngestParams, ValidationParams
from ran.data.beton import LoaderSpec, WriteSettings, make_loader, read_records
from ran.data.ingest import OUTPUTS, ValidationFailed, ingest, tracked_ingest
from ran.errors import RanError


def _params(source: Path, **overrides) -> IngestParams:
    return IngestParams(**{"dataset": "imagefolder", "source": source, **overrides})


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _val_pixels(out: Path, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every val record read back through the project's FFCV loader (it only decodes)."""
    side = meta["splits"]["val"]["max_side"]
    spec = LoaderSpec(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), side=side, small_images=True)
    loader = make_loader(out / "val.beton", spec, batch_size=16, train=False, num_workers=1)
    batches = [(x.numpy(), y.numpy(), i.numpy()) for x, y, i in loader]
    return tuple(np.concatenate([b[k] for b in batches]) for k in range(3))


def test_small_real_tree(cifar10_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    meta = ingest(_params(cifar10_small), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert _leftovers(tmp_path) == []
    assert meta["num_classes"] == 10 and meta["classes"][0] == "airplane"
    assert {s: meta["splits"][s]["count"] for s in ("train", "val")} == {"train": 200, "val": 50}
    assert meta["ffcv"]["write_mode"] == "raw"
    assert meta["source"]["sha256"] and meta["cross_split_duplicates"] == 0
    assert json.loads((out / "meta.json").read_text()) == meta

    train_files = sorted((cifar10_small / "train").glob("*/*.jpg"))
    pixels = np.stack(
        [np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in train_files]
    )
    assert np.allclose(meta["mean"], pixels.mean(axis=(0, 1, 2)))
    assert np.allclose(meta["std"], pixels.std(axis=(0, 1, 2)))

    records = read_records(out / "train.beton")
    assert records["index"].tolist() == list(range(200))
    assert np.bincount(records["label"]).tolist() == [20] * 10

    images, labels, indices = _val_pixels(out, meta)
    assert images.shape == (50, 3, 32, 32) and images.dtype == np.uint8  # decoded only
    assert indices.tolist() == list(range(50))
    val_files = sorted((cifar10_small / "test").glob("*/*.jpg"))
    for i in (0, 17, 49):
        source = np.asarray(Image.open(val_files[i]).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(images[i], source)  # raw mode: exact pixels
        assert labels[i] == meta["classes"].index(val_files[i].parent.name)


def test_same_source_and_params_give_identical_files(cifar10_small: Path, tmp_path: Path) -> None:
    first = ingest(_params(cifar10_small), tmp_path / "a")
    second = ingest(_params(cifar10_small, num_workers=1), tmp_path / "b")
    for name in ("train.beton", "val.beton", "manifest.parquet", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first == second


def test_large_images_proportion_mode_is_seeded(imagenet_tree: Path, tmp_path: Path) -> None:
    params = IngestParams(dataset="imagenet", source=imagenet_tree, max_resolution=160)
    meta = ingest(params, tmp_path / "a")
    assert meta["ffcv"]["write_mode"] == "proportion" and meta["num_classes"] == 100
    assert meta["wnids"][0] == "n01440764" and meta["classes"][0] == "tench"
    assert meta["splits"]["train"]["max_side"] == 160
    modes = read_records(tmp_path / "a" / "train.beton")["mode"]
    assert 0 < modes.sum() < len(modes)  # both JPEG (0) and raw (1) records
    ingest(params, tmp_path / "b")
    ingest(params.model_copy(update={"seed": 1}), tmp_path / "c")
    beton = "train.beton"
    assert (tmp_path / "a" / beton).read_bytes() == (tmp_path / "b" / beton).read_bytes()
    assert (tmp_path / "a" / beton).read_bytes() != (tmp_path / "c" / beton).read_bytes()


def test_cifar_python_archive(tmp_path: Path) -> None:
    archive = write_cifar_python(tmp_path, "cifar10", per_class=3)
    meta = ingest(IngestParams(dataset="cifar10", source=archive), tmp_path / "out")
    assert meta["splits"]["train"]["count"] == 150 and meta["splits"]["val"]["count"] == 30
    assert (
        meta["source"]["sha256"] == __import__("hashlib").sha256(archive.read_bytes()).hexdigest()
    )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def test_truncated_image_fails_naming_it_and_leaves_nothing(
    small_tree: Path, tmp_path: Path
) -> None:
    _truncate(small_tree / "train" / "dog" / "0003.jpg")
    out = tmp_path / "out"
    with pytest.raises(RanError, match=r"train/dog/0003\.jpg.*--skip-bad"):
        ingest(_params(small_tree), out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_skip_bad_records_what_it_skipped(small_tree: Path, tmp_path: Path) -> None:
    _truncate(small_tree / "test" / "cat" / "0001.jpg")
    (small_tree / "train" / "cat" / "notes.jpg").write_text("not an image")
    meta = ingest(_params(small_tree, skip_bad=True), tmp_path / "out")
    assert meta["splits"]["train"]["count"] == 200 and meta["splits"]["val"]["count"] == 49
    assert len(meta["skipped"]) == 2
    assert any("test/cat/0001.jpg" in s for s in meta["skipped"])
    assert len(read_records(tmp_path / "out" / "val.beton")["label"]) == 49


def test_failed_expectation_keeps_only_the_report(small_tree: Path, tmp_path: Path) -> None:
    # Two val images that are exact copies of train images: over a threshold of 1.
    for n, name in enumerate(("0000.jpg", "0001.jpg")):
        source = small_tree / "train" / "ship" / name
        (small_tree / "test" / "ship" / f"copy{n}.jpg").write_bytes(source.read_bytes())
    out = tmp_path / "out"
    params = _params(small_tree, validation=ValidationParams(max_cross_split_duplicates=1))
    with pytest.raises(ValidationFailed, match=r"cross_split_duplicate.*observed 2"):
        ingest(params, out)
    assert [p.name for p in out.iterdir()] == ["validation.json"]
    report = json.loads((out / "validation.json").read_text())
    assert report["success"] is False and len(report["failures"]) == 1
    assert _leftovers(tmp_path) == []
    # The same data passes with a threshold that allows the two copies.
    params = _params(small_tree, validation=ValidationParams(max_cross_split_duplicates=2))
    assert ingest(params, out)["cross_split_duplicates"] == 2


def test_size_bounds_are_checked(cifar10_small: Path, tmp_path: Path) -> None:
    params = _params(cifar10_small, validation=ValidationParams(min_side=33))
    with pytest.raises(ValidationFailed, match="height"):
        ingest(params, tmp_path / "out")


def test_tracked_ingest_logs_an_mlflow_run(cifar10_small: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    meta = tracked_ingest(_params(cifar10_small), tmp_path / "out", "ingest-test")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("ingest-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "ingest"
    assert (
        run.data.params["dataset"] == "imagefolder"
        and run.data.params["validation.min_side"] == "8"
    )
    assert run.data.metrics["train_count"] == 200 and run.data.metrics["validation_success"] == 1
    assert run.data.metrics["mean_r"] == pytest.approx(meta["mean"][0])
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests["imagefolder-train"] == meta["splits"]["train"]["sha256"][:36]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"meta.json", "validation.json"} <= artifacts


def test_failed_ingest_marks_the_run_failed(small_tree: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    _truncate(small_tree / "train" / "dog" / "0003.jpg")
    with pytest.raises(RanError):
        tracked_ingest(_params(small_tree), tmp_path / "out", "ingest-fail")
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("ingest-fail").experiment_id])
    assert run.info.status == "FAILED"


def _hung(signum: int, frame: object) -> None:
    """SIGALRM's handler: fail the test that hung, not the whole run (the default kills it)."""
    raise TimeoutError("no answer within 300 s: hung")


def test_writer_failure_is_an_error_not_a_hang(cifar10_small: Path, tmp_path: Path) -> None:
    """A source file that vanishes after the decode pass kills FFCV's writer process."""
    import multiprocessing
    import signal

    from ran.data.beton import WriteSettings, write_beton
    from ran.data.sources import FileSplit

    files = ["train/cat/0000.jpg", "train/cat/missing.jpg", "train/cat/0001.jpg"]
    split = FileSplit(cifar10_small, files, np.zeros(3, dtype=np.int64))
    settings = WriteSettings("raw", 500, 90, 0.5, seed=0)
    children = set(multiprocessing.active_children())
    signal.signal(signal.SIGALRM, _hung)
    signal.alarm(300)  # a regression would hang: fail the test instead
    try:
        with pytest.raises(RanError, match=r"writing train\.beton failed at train/cat/missing"):
            write_beton(split, np.arange(3), tmp_path / "train.beton", settings, workers=2)
    finally:
        signal.alarm(0)
    assert set(multiprocessing.active_children()) <= children  # FFCV's writer is gone


def test_large_raw_images_get_pages_that_fit(imagenet_tree: Path, tmp_path: Path) -> None:
    """A raw 1,800-px image (9.7 MB) does not fit FFCV's default 8 MiB page: the writer
    process would fail (and FFCV wait forever) unless the page is sized to the data."""
    import signal

    root = tmp_path / "big"
    sources = sorted(imagenet_tree.glob("train/*/*.JPEG"))[:2]
    for n, (image, side) in enumerate(zip(sources, (1800, 400), strict=True)):
        for split in ("train", "val"):
            (root / split / f"c{n}").mkdir(parents=True)
            with Image.open(image) as img:
                img.convert("RGB").resize((side, side)).save(root / split / f"c{n}" / "a.png")
    params = IngestParams(dataset="imagefolder", source=root, write_mode="raw", max_resolution=2000)
    signal.signal(signal.SIGALRM, _hung)
    signal.alarm(300)  # a regression would hang: fail the test instead
    try:
        meta = ingest(params, tmp_path / "out")
    finally:
        signal.alarm(0)
    assert meta["splits"]["train"]["max_side"] == 1800
    assert meta["ffcv"]["page_size"] == WriteSettings.page_size_for(1800 * 1800) == 1 << 24


@pytest.mark.slow
def test_writer_shows_one_rich_bar_not_ffcvs_tqdm(
    cifar10_small: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import ffcv.writer

    from ran.data.beton import write_beton
    from ran.data.sources import FileSplit

    files = sorted(str(p.relative_to(cifar10_small)) for p in cifar10_small.glob("train/*/*"))
    split = FileSplit(cifar10_small, files, np.zeros(len(files), dtype=np.int64))
    tqdm = ffcv.writer.tqdm
    capfd.readouterr()
    settings = WriteSettings("raw", 500, 90, 0.5, seed=0)
    write_beton(split, np.arange(len(files)), tmp_path / "train.beton", settings)
    out, err = capfd.readouterr()
    assert out == ""  # bars go to stderr (ran.progress): stdout is the command's answer
    assert "it/s" not in err and "%|" not in err  # FFCV's tqdm bar
    assert err.count("writing train.beton") == 1 and "200/200" in err
    assert ffcv.writer.tqdm is tqdm  # put back after the write
    assert len(read_records(tmp_path / "train.beton")["index"]) == 200
