"""``ran-cli predict`` on real CIFAR-10 files: the same probabilities as evaluation, every
image format PIL reads, mask overlays, and one-line errors for bad input."""

from __future__ import annotations

import base64
import json
import os
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
    with the quick profile's test-time averaging (flip and translate); a vitmask network
    reads the prior stage's stored maps (``../prior`` beside its training folder)."""
    from ran.data.beton import make_loader
    from ran.data.meta import read_meta
    from ran.inference.predictor import Predictor
    from ran.inference.scoring import scored_batches
    from ran.prior.maps import load_prior

    predictor = Predictor.from_model_file(model / "model.pt")
    loader = make_loader(data / "val.beton", predictor.spec, 16, train=False)
    prior = model.parent / "prior"
    maps = load_prior(prior, "val", read_meta(data)) if predictor.prior else None
    probs = {}
    batches = scored_batches(
        predictor.model, loader, predictor.spec, flip=True, prior=maps, translate=True
    )
    for scores, _, index in batches:
        for i, row in zip(index.tolist(), scores.softmax(1).numpy(), strict=True):
            probs[i] = row
    return probs


@pytest.fixture(scope="module")
def upsampled_model(small_ingest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny network trained on ``small_ingest``'s 32 px images bicubic-upsampled to 40."""
    from conftest import train_tiny

    return train_tiny(small_ingest, tmp_path_factory.mktemp("upsampled"), "--upsample", "40")


TINY_VIT = "test_vit.r160_in1k"  # timm's 0.3M-parameter ViT (16 px patches)


@pytest.fixture(scope="module")
def vitmask_model(small_ingest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vitmask network trained 12 steps on the maps of a tiny ViT (weights from a
    safetensors file, at 64 px: 4×4 maps): ``folder/train``, beside ``folder/prior``; its
    image model logged and registered in ``folder/mlflow.db``, as training does."""
    import timm
    import torch
    from conftest import REPO, run_ok
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("vitmask")
    torch.manual_seed(3)
    weights = folder / "tiny-vit.safetensors"
    save_file(timm.create_model(TINY_VIT, pretrained=False).state_dict(), weights)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    prior = ["prior", "--data", small_ingest, "--out", folder / "prior", "--vit", TINY_VIT,
             "--vit-weights", weights, "--size", "64", "--samples", "0"]  # fmt: skip
    prior += ["--device", "cpu"]
    train = ["train", "--data", small_ingest, "--out", folder / "train", "--family", "vitmask",
             "--prior", folder / "prior", "--mask-strength", "0.5", "--width", "0.25"]  # fmt: skip
    train += ["--iterations", "12", "--batch-size", "20", "--device", "cpu"]  # logs the model
    for args in (prior, train):
        run_ok([*CLI, *map(str, args)], REPO, env)
    return folder / "train"


@pytest.mark.parametrize("model", ["trained_model", "upsampled_model", "vitmask_model"])
def test_predictions_equal_evaluation_on_the_test_files(
    model: str, small_ingest: Path, cifar10_small: Path, request: pytest.FixtureRequest
) -> None:
    """Every real test JPEG, predicted from its file, gets the probabilities evaluation
    computed for its record (all 10 classes, so the whole distribution is compared), also
    for a network trained on upsampled images (cut at 32 px, then upsampled as in training)
    and for a vitmask network, whose prior map predict computes from the file with the ViT
    the prior stage ran (evaluation reads the stage's stored map)."""
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


def _same(answers: list[dict], expected: list[dict]) -> None:
    assert [a["labels"] for a in answers] == [e["labels"] for e in expected]
    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(answer["probs"], want["probs"], rtol=1e-5, atol=1e-7)


def test_vitmask_image_model_carries_its_vit(
    vitmask_model: Path, cifar10_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image model training logged for a vitmask network holds its ViT's weights file:
    it loads with pickle refused and answers as ``model.pt`` does although the file its
    record names is gone, which ``model.pt`` alone then asks for (and refuses another
    file); its input example and a batch of requests to the server's worker score the
    same; its masks are drawn."""
    import torch

    from ran.data.sources import sha256_file
    from ran.errors import RanError
    from ran.inference.predict import predict_files
    from ran.inference.predictor import Predictor, load_predictor
    from ran.serving import ImageAPI, ScoringRequest, local_model

    files = sorted((cifar10_small / "test" / "cat").iterdir())[:3]
    blobs = [f.read_bytes() for f in files]
    expected = Predictor.from_model_file(vitmask_model / "model.pt").predict_bytes(blobs)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{vitmask_model.parent / 'mlflow.db'}")
    local = Path(local_model("models:/cifar10-vitmask8/1", tmp_path))  # training registered it
    model_file = local / "artifacts" / "model.pt"
    record = torch.load(model_file, weights_only=True)
    prior = record["prior"]
    assert prior["init"] == "pretrained" and prior["seed"] == 0
    assert sha256_file(local / "artifacts" / "vit.safetensors") == prior["weights_sha256"]
    prior["weights"] = str(tmp_path / "moved" / Path(prior["weights"]).name)
    torch.save(record, model_file)  # the file the prior stage read is gone
    with pytest.raises(RanError, match="which are not here: pass that file with --vit-weights"):
        Predictor.from_model_file(model_file)
    with pytest.raises(RanError, match="are not those the prior"):
        Predictor.from_model_file(model_file, vit_weights=files[0])

    predictor = load_predictor(str(local))  # pickle refused; the ViT from artifacts/
    _same(predictor.predict_bytes(blobs), expected)
    result = predict_files(predictor, files[:1], masks=tmp_path / "masks")
    assert result.rows[0]["labels"] == expected[0]["labels"]
    assert len(list((tmp_path / "masks").glob("*.module-*.png"))) == 3  # B_a's three masks

    # ran-cli serve's worker: requests waiting together are scored as one batch, a bad one
    # answered on its own; the model's own serving example among them
    api = ImageAPI(str(local), max_batch_size=4, batch_timeout=0.01)
    api.setup("cpu")
    example = json.loads((local / "serving_input_example.json").read_text())["inputs"]
    bodies = [example, [base64.b64encode(b).decode() for b in blobs], ["!!"]]
    batch = api.batch([api.decode_request(ScoringRequest(inputs=b)) for b in bodies])
    served, answers, bad = api.unbatch(api.predict(batch))
    _same(served, predictor.predict_bytes([base64.b64decode(example[0])]))
    _same(answers, expected)
    assert "inputs[0] is not base64" in bad


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
