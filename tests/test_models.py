"""Tests of the model zoo: every variant trains a step, the attention maths holds, and the
parameter and MAC counts match the paper (architecture facts, asserted with tolerance)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck
from typer.testing import CliRunner

from ran.cli import app
from ran.errors import RanError
from ran.models import (
    ResidualAttentionNet,
    build_model,
    count_macs,
    count_params,
    find_variant,
    get_variant,
    list_variants,
    model_table,
)
from ran.models.attention import AttentionModule, EncoderDecoderMask
from ran.models.blocks import ConvUnit, PreActBottleneck, ResNeXtBottleneck, WhiteningStem
from ran.models.vitmask import BasicBlock

VARIANTS = list_variants()
NUM_CLASSES = 7  # not a dataset default, so a hard-wired class count would show


def _tiny(name: str, **options: object) -> nn.Module:
    """The variant at a quarter width where the family supports a width multiplier."""
    variant = get_variant(name)
    if variant.family == "resnet" and variant.dataset == "imagenet":
        return build_model(name, NUM_CLASSES, **options)  # torchvision: full width only
    return build_model(name, NUM_CLASSES, width=0.25, **options)


def _small_input(name: str, batch: int = 2) -> torch.Tensor:
    """32 px for CIFAR; 64 px for ImageNet networks (every mask still pools to >= 1 px)."""
    size = 32 if get_variant(name).dataset == "cifar" else 64
    return torch.randn(batch, 3, size, size)


@pytest.fixture(scope="module")
def table() -> dict[str, dict]:
    return {row["name"]: row for row in model_table()}


@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
def test_variant_trains_one_step(name: str) -> None:
    """Builds, runs forward and backward, and every parameter gets a finite gradient:
    a layer the forward pass skips would keep ``grad is None``."""
    torch.manual_seed(0)
    model = _tiny(name)
    x = _small_input(name)
    prior = [torch.rand(2, 1, 4, 4)] if getattr(model, "takes_prior", False) else []
    logits = model(x, *prior)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unused = [n for n, p in trained if p.grad is None]
    assert not unused, f"parameters without gradient: {unused[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trained)


@pytest.mark.parametrize(
    "options",
    [
        {"arl": False},
        {"attention": "channel"},
        {"attention": "spatial"},
        {"mask": "local"},
    ],
)
def test_ablation_switches_train(options: dict) -> None:
    torch.manual_seed(0)
    model = _tiny("attention92-cifar", **options)
    model(_small_input("attention92-cifar")).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("attention", ["mixed", "channel", "spatial"])
def test_masks_lie_in_the_attention_function_range(attention: str) -> None:
    torch.manual_seed(0)
    model = _tiny("attention56-cifar", attention=attention)
    x = _small_input("attention56-cifar")
    logits, masks = model(x, return_masks=True)
    modules = [m for m in model.modules() if isinstance(m, AttentionModule)]
    assert len(masks) == len(modules) == 3
    assert [m.shape[-1] for m in masks] == [32, 16, 8]
    torch.testing.assert_close(logits, model(x))  # asking for masks changes nothing
    for mask in masks:
        if attention == "channel":
            torch.testing.assert_close(mask.norm(dim=1), torch.ones_like(mask[:, 0]))
            assert mask.abs().max() <= 1 + 1e-6
        else:
            assert mask.min() >= 0 and mask.max() <= 1
            assert mask.std() > 0  # not a constant 0.5


def _module_tensors(
    module: AttentionModule, x: torch.Tensor, zero_mask: bool = False
) -> dict[str, torch.Tensor]:
    """Trunk output T, mask M and fused H (the input of the post units) of one module."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.trunk.register_forward_hook(lambda m, i, o: seen.__setitem__("T", o.clone())),
        module.mask.register_forward_hook(
            lambda m, i, o: torch.zeros_like(o) if zero_mask else None
        ),
        module.mask.register_forward_hook(lambda m, i, o: seen.__setitem__("M", o.clone())),
        module.post.register_forward_pre_hook(lambda m, i: seen.__setitem__("H", i[0].clone())),
    ]
    try:
        module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("arl", [True, False])
def test_fusion_is_residual_or_naive(arl: bool) -> None:
    torch.manual_seed(0)
    module = AttentionModule(PreActBottleneck, 16, p=1, t=2, r=1, levels=2, arl=arl).eval()
    seen = _module_tensors(module, torch.randn(2, 16, 16, 16))
    expected = (1 + seen["M"]) * seen["T"] if arl else seen["M"] * seen["T"]
    torch.testing.assert_close(seen["H"], expected)


def test_arl_with_zero_mask_passes_the_trunk_through() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16, 16)
    arl = AttentionModule(PreActBottleneck, 16, p=1, t=2, r=1, levels=2, arl=True).eval()
    seen = _module_tensors(arl, x, zero_mask=True)
    assert seen["M"].abs().max() == 0
    assert seen["T"].abs().max() > 0
    torch.testing.assert_close(seen["H"], seen["T"])
    naive = AttentionModule(PreActBottleneck, 16, p=1, t=2, r=1, levels=2, arl=False).eval()
    assert _module_tensors(naive, x, zero_mask=True)["H"].abs().max() == 0


def test_mask_structures_have_the_same_units() -> None:
    """The local-convolution ablation keeps the unit count, only drops the resampling."""
    for levels in (1, 2, 3):
        shapes = {
            mask: count_params(
                AttentionModule(PreActBottleneck, 16, p=1, t=2, r=1, levels=levels, mask=mask)
            )
            for mask in ("encoder_decoder", "local")
        }
        assert shapes["encoder_decoder"] == shapes["local"]


@pytest.mark.parametrize(
    ("name", "size", "bottom"),
    [("attention92-imagenet", 224, 7), ("attention92-cifar", 32, 4)],
)
def test_masks_bottom_out_at_one_resolution(name: str, size: int, bottom: int) -> None:
    """3/2/1 poolings (Caffe ceil rounding, padding 0) end every mask at the same size:
    56 -> 28 -> 14 -> 7 on ImageNet, 32 -> 16 -> 8 -> 4 on CIFAR."""
    with torch.device("meta"):
        model = build_model(name)
    lowest: list[int] = []
    hooks = [
        m.bottom.register_forward_hook(lambda mod, i, o: lowest.append(o.shape[-1]))
        for m in model.modules()
        if isinstance(m, EncoderDecoderMask)
    ]
    model(torch.empty(1, 3, size, size, device="meta"))
    for hook in hooks:
        hook.remove()
    assert len(lowest) == len(list(m for m in model.modules() if isinstance(m, AttentionModule)))
    assert set(lowest) == {bottom}


@pytest.mark.parametrize("size", [320, 100])
def test_attention_networks_take_any_input_size(size: int) -> None:
    """Upsampling targets the restored feature's size, so 320 px (the authors' test size)
    and odd sizes work with the same weights."""
    model = _tiny("attention92-imagenet").eval()
    with torch.no_grad():
        logits, masks = model(torch.randn(1, 3, size, size), return_masks=True)
    assert logits.shape == (1, NUM_CLASSES)
    assert all(torch.isfinite(m).all() for m in masks)


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    model = _tiny("attention56-cifar").eval()
    x = _small_input("attention56-cifar")
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def _main_path_units(model: nn.Module, kinds: tuple[type, ...]) -> int:
    """Residual units outside the soft mask branches: the ones that count towards depth."""
    return sum(
        isinstance(m, kinds) and ".mask." not in f".{name}." for name, m in model.named_modules()
    )


@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
def test_depth_counts_the_weighted_layers(name: str) -> None:
    """Depth = stem conv + 3 per bottleneck unit (2 per basic unit, 1 per airbench unit) on
    the main path + classifier."""
    with torch.device("meta"):
        model = build_model(name)
    bottlenecks = _main_path_units(model, (PreActBottleneck, ResNeXtBottleneck, Bottleneck))
    basic = _main_path_units(model, (BasicBlock,))
    single = _main_path_units(model, (ConvUnit,))
    assert 2 + 3 * bottlenecks + 2 * basic + single == get_variant(name).depth


REFERENCED = [v for v in VARIANTS if v.ref_params is not None]


@pytest.mark.parametrize("name", [v.name for v in REFERENCED])
def test_params_and_macs_match_the_paper(name: str, table: dict[str, dict]) -> None:
    """Within 3 % on ImageNet (params and MACs at 224 px) and 5 % on CIFAR (params)."""
    variant, row = get_variant(name), table[name]
    tolerance = 0.03 if variant.dataset == "imagenet" else 0.05
    assert row["params"] / 1e6 == pytest.approx(variant.ref_params, rel=tolerance)
    if variant.ref_macs is not None:
        assert row["macs"] / 1e9 == pytest.approx(variant.ref_macs, rel=tolerance)


@pytest.mark.parametrize(
    ("name", "params_m", "gmacs"),
    [("attention56-imagenet", 31.81, 6.27), ("attention92-imagenet", 52.47, 10.53)],
)
def test_counts_match_the_authors_prototxt(
    name: str, params_m: float, gmacs: float, table: dict[str, dict]
) -> None:
    """The authors' Caffe definitions run in PyTorch give these; a faithful port too."""
    assert table[name]["params"] / 1e6 == pytest.approx(params_m, abs=0.005)
    assert table[name]["macs"] / 1e9 == pytest.approx(gmacs, abs=0.005)


def test_macs_are_counted_at_the_given_size() -> None:
    with torch.device("meta"):
        model = build_model("resnet164-cifar")
    assert count_macs(model, 64) == pytest.approx(4 * count_macs(model, 32), rel=0.01)


def test_num_classes_sets_the_classifier() -> None:
    model = build_model("attention56-cifar", num_classes=100, width=0.25)
    assert isinstance(model, ResidualAttentionNet)
    assert model.fc.out_features == 100


def test_unknown_depth_names_the_valid_depths() -> None:
    with pytest.raises(RanError) as error:
        find_variant("attention", 93, "cifar")
    message = str(error.value)
    assert message == (
        "unknown depth 93 for attention (cifar); valid depths: 8, 56, 92, 128, 164, 236, 452"
    )
    assert find_variant("attention", 92, "imagenet").name == "attention92-imagenet"


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: find_variant("attention", 92, "mnist"), "valid datasets: cifar, imagenet"),
        (lambda: find_variant("vgg", 16, "cifar"), "valid families:"),
        (lambda: get_variant("attention93-cifar"), "valid models: attention56-imagenet"),
        (lambda: build_model("resnet50-imagenet", arl=False), "arl do not apply"),
        (lambda: build_model("attention56-cifar", attention="softmax"), "valid: mixed"),
        (lambda: build_model("attention56-cifar", mask="pyramid"), "valid: encoder_decoder"),
    ],
)
def test_user_errors_are_one_line(call, fragment: str) -> None:
    with pytest.raises(RanError, match=fragment) as error:
        call()
    assert "\n" not in str(error.value)


def test_cli_models_json_lists_every_variant(
    table: dict[str, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command prints the library's rows; the rows themselves are tested above (the
    patch only saves building every variant a second time)."""
    monkeypatch.setattr("ran.models.model_table", lambda: list(table.values()))
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == [v.name for v in VARIANTS]
    for row in rows:
        assert {"name", "input_size", "params", "macs"} <= row.keys()
        assert row["params"] == table[row["name"]]["params"]


def test_cli_models_prints_a_table(table: dict[str, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ran.models.model_table", lambda: list(table.values()))
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "attention452-cifar" in result.output
    assert "31.81" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("name", ["attention56-imagenet", "attentionnext56-imagenet"])
def test_full_width_imagenet_forward_at_224(name: str) -> None:
    """The real thing, once: full width, 224 px, parameters counted on real tensors."""
    model = build_model(name).eval()
    with torch.no_grad():
        logits, masks = model(torch.randn(1, 3, 224, 224), return_masks=True)
    assert logits.shape == (1, 1000)
    assert [m.shape[-1] for m in masks] == [56, 28, 14]
    assert count_params(model) == pytest.approx(31.9e6, rel=0.03)


def test_model_table_is_cached_by_model_code(
    table: dict[str, dict], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import ran.model_table as cached

    calls = []
    monkeypatch.setattr("ran.models.model_table", lambda: calls.append(1) or list(table.values()))
    first = cached.model_table()
    assert cached.model_table() == first and len(calls) == 1  # second listing: from the cache
    source = tmp_path / "models"
    source.mkdir()
    (source / "ran.py").write_text("# changed model code\n")
    monkeypatch.setattr(cached, "MODELS_SOURCE", source)
    assert cached.model_table() == first and len(calls) == 2  # new code: measured again


def test_whitening_stem_decorrelates_the_patches_it_was_fitted_to() -> None:
    """airbench94's stem: its 12 filters map 2x2 patches of correlated colours and
    neighbouring pixels to unit, uncorrelated features; the other 12 are their negatives."""
    torch.manual_seed(0)
    images = torch.einsum("ij,njhw->nihw", torch.randn(3, 3), torch.randn(64, 3, 16, 16))
    images = images + 0.8 * images.roll(1, dims=3) + 0.5 * images.roll(1, dims=2)
    stem = WhiteningStem()
    stem.fit(images)
    half = torch.nn.functional.conv2d(images, stem.conv.weight[:12])
    features = half.permute(0, 2, 3, 1).reshape(-1, 12)
    second_moment = features.T @ features / len(features)
    assert torch.allclose(second_moment, torch.eye(12), atol=0.02)
    assert torch.equal(stem.conv.weight[12:], -stem.conv.weight[:12])
    assert not stem.conv.weight.requires_grad and stem.conv.bias.requires_grad
