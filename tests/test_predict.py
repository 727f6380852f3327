"""``ran-cli predict`` on real CIFAR-10 files: the same probabilities as evaluation, every
image format PIL reads, mask overlays, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

CLI = [sys.executable, "-m", "ran.cli"]


def _predict(
    *args: object, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*CLI, "predict", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _evaluation_probabilities(model: Path, data: Path) -> dict[int, np.ndarray]:
    """Per test record: the class probabilities evaluation's loader and forward pass give,
    with the quick profile's test-time averaging (flip and translate)."""
    from ran.data.beton import make_loader
    from ran.inference.predictor import Predictor
    from ran.inference.scoring import scored_batches

    predictor = Predictor.from_model_file(model / "model.pt")
    loader = make_loader(data / "val.beton", predictor.spec, 16, train=False)
    probs = {}
    batches = scored_batches(predictor.model, loader, predictor.spec, flip=True, translate=True)
    for scores, _, index in batches:
        for i, row in zip(index.tolist(), scores.softmax(1).numpy(), strict=True):
            probs[i] = row
    return probs


@pytest.fixture(scope="module")
def upsampled_model(small_ingest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny network trained on ``small_ingest``'s 32 px images bicubic-upsampled to 40."""
    from conftest import train_tiny

    return train_tiny(small_ingest, tmp_path_factory.mktemp("upsampled"), "--upsample", "40")


@pytest.mark.parametrize("model", ["trained_model", "upsampled_model"])
def test_predictions_equal_evaluation_on_the_test_files(
    model: str, small_ingest: Path, cifar10_small: Path, request: pytest.FixtureRequest
) -> None:
    """Every real test JPEG, predicted from its file, gets the probabilities evaluation
    computed for its record (all 10 classes, so the whole distribution is compared), also
    for a network trained on upsampled images (cut at 32 px, then upsampled as in training)."""
    trained_model = request.getfixturevalue(model)
    rows = json.loads(_predict(cifar10_small / "test", "--model", trained_model, "--json",
                               "--top", 10, "--flip", "--translate").stdout)  # fmt: skip
    expected = _evaluation_probabilities(trained_model, small_ingest)
    manifest = pd.read_parquet(small_ingest / "manifest.parquet")
    record = {
        s: int(i)
        for s, i in manifest.query("split == 'val'")[["source", "index"]].itertuples(index=False)
    }  # fmt: skip  (source: test/<class>/<file>.jpg)
    classes = json.loads((small_ingest / "meta.json").read_text())["classes"]
    assert len(rows) == len(expected) == 50
    for row in rows:
        probs = expected[record[Path(row["file"]).relative_to(cifar10_small).as_posix()]]
        assert row["labels"][0] == classes[int(probs.argmax())]
        ours = np.array([row["probs"][row["labels"].index(c)] for c in classes])
        np.testing.assert_allclose(ours, probs, rtol=1e-5, atol=1e-6)
    assert len({tuple(r["labels"][:2]) for r in rows}) > 1  # not one answer for all


def _formats(source: Path, folder: Path) -> dict[str, Path]:
    """One real CIFAR-10 image written in each format and mode a user's folder may hold."""
    folder.mkdir()
    rgb = Image.open(source).convert("RGB").resize((48, 40))
    files = {
        "png": folder / "plain.png",
        "webp": folder / "lossless.webp",
        "grey": folder / "grey.jpg",
        "cmyk": folder / "cmyk.jpg",
        "palette": folder / "palette.png",
        "sixteen": folder / "sixteen.png",
        "rotated": folder / "rotated.jpg",
    }
    rgb.save(files["png"])
    rgb.save(files["webp"], lossless=True)
    rgb.convert("L").save(files["grey"])
    rgb.convert("CMYK").save(files["cmyk"])
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(files["palette"])
    wide = (np.asarray(rgb.convert("L"), dtype=np.uint32) * 257).astype(np.uint16)
    Image.fromarray(wide).save(files["sixteen"])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    rgb.save(files["rotated"], exif=exif)
    return files


def test_every_format_predicts_and_masks_are_drawn(
    trained_model: Path, cifar10_small: Path, tmp_path: Path
) -> None:
    from ran.inference.images import read_image

    source = sorted((cifar10_small / "test" / "cat").iterdir())[0]
    files = _formats(source, tmp_path / "mine")
    grey = np.asarray(Image.open(files["png"]).convert("L"))  # lossless: what 16-bit holds
    assert np.abs(read_image(files["sixteen"], "x")[:, :, 0].astype(int) - grey).max() <= 1
    assert read_image(files["rotated"], "x").shape == (48, 40, 3)  # upright: EXIF applied
    masks = tmp_path / "masks"
    result = _predict("mine", "--model", trained_model, "--masks", masks, cwd=tmp_path)
    for path in files.values():
        assert f"mine/{path.name}" in result.stdout  # the table names every file
    for path in files.values():  # width-0.25 Attention-56: three attention modules
        drawn = sorted(p.name for p in masks.glob(f"{path.stem}.*"))
        assert drawn == [f"{path.stem}.module-{n}.png" for n in (1, 2, 3)] + [
            f"{path.stem}.strip.png"
        ]
    strip = Image.open(masks / "plain.strip.png")
    module = Image.open(masks / "plain.module-1.png")
    assert module.size == (128, 128) and strip.size == (4 * 128 + 3 * 4, 128)
    assert np.asarray(module).std() > 0  # a blended picture, not a blank


def test_bad_input_is_one_line_and_skip_bad_goes_on(
    trained_model: Path, cifar10_small: Path, tmp_path: Path
) -> None:
    good = sorted((cifar10_small / "test" / "dog").iterdir())[:2]
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:300])
    masks = tmp_path / "masks"
    for bad, says in ((tmp_path / "missing.jpg", "does not exist"),
                      (notes, "is not an image"), (truncated, "is damaged")):  # fmt: skip
        result = _predict(*good, bad, "--model", trained_model, "--masks", masks, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {bad}") and says in lines[0]
        assert not masks.exists()  # nothing partial
    result = _predict(*good, notes, truncated, tmp_path / "missing.jpg", "--model", trained_model,
                      "--skip-bad", "--json")  # fmt: skip
    assert [Path(r["file"]).name for r in json.loads(result.stdout)] == [g.name for g in good]
    assert "skipped 3:" in result.stderr and "notes.jpg" in result.stderr
    wrong = _predict(good[0], "--model", tmp_path / "nowhere", check=False)
    assert wrong.returncode == 1 and "does not exist" in wrong.stderr
    from ran.errors import RanError
    from ran.inference.predictor import load_predictor

    with pytest.raises(RanError, match=r"cannot load MLflow model models:/nope/1 from sqlite"):
        load_predictor("models:/nope/1")


@pytest.mark.parametrize("side", [32, 200])
def test_network_input_follows_ffcv(side: int) -> None:
    """The cut is FFCV's: CIFAR-size keeps 32 px as is; ImageNet-size takes the central
    224/256 of the short side, area-resized (compared with FFCV's own C resize)."""
    from ffcv.fields.rgb_image import get_center_crop
    from ffcv.libffcv import resize_crop

    from ran.inference.images import network_input

    image = np.random.default_rng(side).integers(0, 256, (side, side + 50, 3), dtype=np.uint8)
    small = side == 32
    ours = network_input(image, 32 if small else 64, small)
    if small:
        top, left = 0, 25
        np.testing.assert_array_equal(ours, image[top : top + 32, left : left + 32])
        return
    top, left, h, w = get_center_crop(side, side + 50, None, 224 / 256)
    reference = np.zeros((64, 64, 3), dtype=np.uint8)
    resize_crop(image, top, top + h, left, left + w, reference)
    np.testing.assert_array_equal(ours, reference)
