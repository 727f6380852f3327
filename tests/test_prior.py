"""The ViT attention prior and the vitmask network: the [CLS] attention against timm's own
attention weights, weights files through timm's loading path, the a = 0 network against
ResNet-8, the joint augmentation of image and map, and the whole path on real CIFAR-10
(``ran-cli prior`` → ``train --family vitmask`` → ``evaluate``) with a ViT from a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ran.config import TrainParams
from ran.data.beton import LoaderSpec
from ran.data.transforms import normalize
from ran.errors import RanError
from ran.models import build_model
from ran.prior.vit import cls_attention, load_vit
from ran.train.augment import BatchTransform

CLI = [sys.executable, "-m", "ran.cli"]
VIT = "vit_small_patch8_224.dino"


def _tiny_vit(**kwargs: object) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    options = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 4}
    return VisionTransformer(**{**options, **kwargs, "num_classes": 0}).eval()


@pytest.mark.parametrize("registers", [0, 2])
def test_cls_attention_is_the_last_blocks_softmax_weights(registers: int) -> None:
    """Computed from the block's q/k, it equals what timm's unfused attention softmaxes
    (captured at its attention dropout), row [CLS], patch columns, mean or max over heads."""
    vit = _tiny_vit(reg_tokens=registers)
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        vit.forward_features(x)
        mean, peak = cls_attention(vit, x, "mean"), cls_attention(vit, x, "max")
    direct = seen[0][:, :, 0, vit.num_prefix_tokens :]  # N × heads × patches
    assert mean.shape == (5, 4, 4)
    torch.testing.assert_close(mean.flatten(1), direct.mean(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(peak.flatten(1), direct.amax(1), rtol=1e-5, atol=1e-7)
    assert (mean.flatten(1).sum(1) < 1).all()  # [CLS] and registers take the rest
    assert not torch.allclose(mean, mean[:1].expand_as(mean))  # images differ


def test_weights_file_loads_through_timms_pretrained_path(tmp_path: Path) -> None:
    """A saved ViT-S/8 comes back identical at 224 px; at 32 px its position embeddings are
    interpolated (the grid shrinks, the rest is the file's); another ViT's file is a
    one-line error, and so is a side that is not a multiple of the patch."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    original = timm.create_model(VIT, pretrained=False)
    path = tmp_path / "vit.safetensors"
    save_file(original.state_dict(), path)
    same = load_vit(VIT, path, 224)
    for name, tensor in original.state_dict().items():
        assert torch.equal(same.state_dict()[name], tensor), name
    small = load_vit(VIT, path, 32)
    assert small.pos_embed.shape == (1, 1 + 16, 384)
    assert torch.equal(small.blocks[5].attn.qkv.weight, original.blocks[5].attn.qkv.weight)
    assert not any(p.requires_grad for p in small.parameters())
    with pytest.raises(RanError, match=r"do not fit vit_base_patch8_224\.dino") as wrong:
        load_vit("vit_base_patch8_224.dino", path, 224)
    assert "\n" not in str(wrong.value)
    with pytest.raises(RanError, match="not a multiple"):
        load_vit(VIT, path, 36)
    with pytest.raises(RanError, match="does not exist"):
        load_vit(VIT, tmp_path / "missing.pth", 224)
    with pytest.raises(RanError, match="unknown ViT"):
        load_vit("vit_nonexistent", path, 224)


def test_constant_prior_is_uniform_on_the_vits_grid(tmp_path: Path) -> None:
    """``init: constant`` (the vitmask study's control): every map the uniform distribution
    over the grid the ViT gives at that size, whatever the image; no weights are read; the
    maps pass the prior stage's validation and read as flat; the network sees all ones."""
    from ran.models.vitmask import PriorMasks
    from ran.prior.maps import map_statistics
    from ran.prior.stage import validate_prior
    from ran.prior.vit import prior_source

    source = prior_source(VIT, tmp_path / "absent.safetensors", 32, "constant", "mean")
    assert source.grid == (4, 4) and source.vit.patch_embed.patch_size[0] == 8
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    maps = source(images)
    assert maps.shape == (3, 4, 4) and maps.dtype == torch.float32
    assert torch.equal(maps, torch.full_like(maps, 1 / 16))
    stored = maps.numpy().astype(np.float16)
    assert validate_prior({"train": stored}, {"train": 3}).success
    stats = map_statistics(stored)
    assert stats["mean_normalised_entropy"] == pytest.approx(1.0)
    assert stats["mean_peak_over_mean"] == pytest.approx(1.0)
    branch = PriorMasks()  # the map as the attention branch takes it: all ones (mean 1)
    seen = []
    branch.stem.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    branch(maps[:, None], (32, 32))
    torch.testing.assert_close(seen[0], torch.ones(3, 1, 32, 32))


def test_mask_strength_zero_is_exactly_resnet8() -> None:
    """Same weights, same output: a = 0 adds nothing; a > 0 changes the output."""
    vitmask = build_model("vitmask8-cifar", 10, strength=0.0).eval()
    resnet8 = build_model("resnet8-cifar", 10).eval()
    resnet8.load_state_dict(vitmask.classifier.state_dict())
    x, prior = torch.randn(6, 3, 32, 32), torch.rand(6, 1, 4, 4)
    with torch.inference_mode():
        assert torch.equal(vitmask(x, prior), resnet8(x))
        vitmask.strength = 0.5
        assert not torch.allclose(vitmask(x, prior), resnet8(x))
        _, masks = vitmask(x, prior, return_masks=True)
    # each mask has the shape of the classification features it multiplies
    assert [tuple(m.shape[1:]) for m in masks] == [(64, 8, 8), (64, 8, 8), (128, 4, 4)]
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in masks)


def test_joint_augmentation_keeps_image_and_map_aligned() -> None:
    """A map that is a function of the image (its first normalised channel) is still that
    function of the augmented image: same crop, flip and erasing."""
    spec = LoaderSpec((125.0, 123.0, 114.0), (63.0, 62.0, 66.0), 32, True)
    params = TrainParams(random_erasing=1.0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    as_map = normalize(images, spec)[:, :1]
    transform = BatchTransform(spec, params, seed=3)
    x, maps = transform(images, np.arange(16), epoch=2, maps=as_map)
    torch.testing.assert_close(maps, x[:, :1].contiguous(), rtol=0, atol=1e-6)
    plain, _ = transform(images, np.arange(16), epoch=2)
    assert torch.equal(plain, x)  # the map changes nothing of the image
    assert not torch.equal(x[:, :1], as_map)  # something did move
    # a low-resolution map is resized to the image and moved with it
    coarse = torch.nn.functional.avg_pool2d(as_map, 8)
    _, moved = transform(images, np.arange(16), epoch=2, maps=coarse)
    assert moved.shape == (16, 1, 32, 32)


def _run(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_prior_train_evaluate_on_real_cifar10(small_ingest: Path, tmp_path: Path) -> None:
    """The issue's path on real CIFAR-10 images: a ViT-S/8 saved by the test, loaded by
    ``ran-cli prior --vit-weights``; then vitmask trained on the maps and evaluated."""
    import timm
    from mlflow import MlflowClient

    torch.manual_seed(2)
    weights = tmp_path / "dino-vits8.pth"
    torch.save(timm.create_model(VIT, pretrained=False).state_dict(), weights)
    prior = tmp_path / "prior"
    out = _run(
        "prior",
        "--data",
        small_ingest,
        "--out",
        prior,
        "--vit-weights",
        weights,
        "--size",
        32,
        "--batch-size",
        64,
        "--samples",
        4,
        "--device",
        "cpu",
    )
    assert json.loads(out.stdout)["grid"] == [4, 4]
    meta = json.loads((small_ingest / "meta.json").read_text())
    train_maps = np.load(prior / "train.npy", mmap_mode="r")
    assert train_maps.dtype == np.float16
    assert train_maps.shape == (meta["splits"]["train"]["count"], 4, 4)
    assert np.load(prior / "val.npy").shape == (meta["splits"]["val"]["count"], 4, 4)
    report = json.loads((prior / "report.json").read_text())
    assert report["weights_sha256"] and report["init"] == "pretrained"
    assert json.loads((prior / "validation.json").read_text())["success"] is True
    assert (prior / "sample.png").stat().st_size > 0

    # the maps are the ViT's [CLS] attention of those very images
    from ran.data.beton import make_loader
    from ran.prior.vit import vit_normalize

    vit = load_vit(VIT, weights, 32)
    loader = make_loader(small_ingest / "val.beton", LoaderSpec.from_meta(meta), 8, train=False)
    images, _, index = next(iter(loader))
    with torch.inference_mode():
        expected = cls_attention(vit, vit_normalize(images, vit, 32)).numpy()
    val_maps = np.load(prior / "val.npy")
    np.testing.assert_allclose(val_maps[index.numpy()], expected, rtol=2e-3, atol=1e-5)

    train = tmp_path / "train"
    common = ["--depth", "8", "--batch-size", "20", "--device", "cpu", "--no-log-model"]
    refused = _run(
        "train", "--data", small_ingest, "--out", train, "--family", "vitmask", *common, check=False
    )
    assert refused.returncode == 1 and "needs the ViT attention prior" in refused.stderr
    result = _run(
        "train",
        "--data",
        small_ingest,
        "--out",
        train,
        "--family",
        "vitmask",
        "--prior",
        prior,
        "--mask-strength",
        "0.5",
        "--iterations",
        "12",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--random-erasing",
        "0.5",
        *common,
    )
    assert result.stdout.startswith("{"), (result.stdout[-2000:], result.stderr[-2000:])
    summary = json.loads(result.stdout)
    assert summary["variant"] == "vitmask8-cifar" and summary["iterations"] == 12
    record = torch.load(train / "model.pt", weights_only=True)
    assert record["arch"]["options"] == {"strength": 0.5, "width": 1.0}
    assert record["prior"]["vit"] == VIT and record["prior"]["grid"] == [4, 4]

    missing = _run(
        "evaluate",
        "--model",
        train / "model.pt",
        "--data",
        small_ingest,
        "--out",
        tmp_path / "eval",
        check=False,
    )
    assert missing.returncode == 1 and "--prior" in missing.stderr
    assert not (tmp_path / "eval").exists()
    metrics = json.loads(
        _run(
            "evaluate",
            "--model",
            train / "model.pt",
            "--data",
            small_ingest,
            "--prior",
            prior,
            "--out",
            tmp_path / "eval",
            "--masks",
            2,
        ).stdout
    )
    assert metrics["test_records"] == meta["splits"]["val"]["count"]
    assert len(list((tmp_path / "eval" / "masks").glob("*.png"))) == 2

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("residual-attention").experiment_id])
    stages = {r.data.tags["stage"]: r for r in runs}
    assert {"prior", "train", "evaluate"} <= set(stages)
    assert stages["prior"].data.params["size"] == "32"
    assert stages["train"].data.params["mask_strength"] == "0.5"
    assert "val_mean_normalised_entropy" in stages["prior"].data.metrics
