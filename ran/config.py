"""Typed parameters: one model per ``params.yaml`` section, shared by the CLI and DVC stages.

``params.yaml`` is the single source of defaults for DVC runs; the CLI takes the same
fields as options. Both go through these pydantic models, so a bad value gives the same
one-line error whichever door it came through.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ran.errors import RanError

PARAMS_FILE = Path("params.yaml")
SOURCE_ENV = "RAN_INGEST_SOURCE"
CACHE_ENV = "RAN_CACHE"

Model = TypeVar("Model", bound=BaseModel)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValidationParams(_Params):
    """Bounds for the Great Expectations checks on what ingestion produced."""

    min_side: int = Field(8, ge=1, description="smallest image side allowed (px)")
    max_side: int = Field(10_000, ge=1, description="largest image side allowed (px)")
    max_cross_split_duplicates: int = Field(
        10, ge=0, description="val images whose exact pixels also occur in train (CIFAR has a few)"
    )


class IngestParams(_Params):
    """How a source becomes ``train.beton`` + ``val.beton``."""

    dataset: Literal["cifar10", "cifar100", "imagenet", "tiny-imagenet", "imagefolder"] = Field(
        "cifar10",
        description="what the data is: cifar10 | cifar100 | imagenet | tiny-imagenet | imagefolder",
    )
    source: Path | None = Field(None, description="local archive or folder; None = download")
    skip_bad: bool = Field(False, description="skip unreadable images (listed in meta.json)")
    seed: int = Field(0, description="seeds FFCV's per-image JPEG/raw choice")
    num_workers: int = Field(2, ge=1, description="processes decoding source images")
    write_mode: Literal["auto", "raw", "proportion", "jpg", "smart"] = Field(
        "auto", description="auto: raw when every side fits raw_max_side, else proportion"
    )
    raw_max_side: int = Field(64, ge=1, description="largest side stored raw by write_mode auto")
    max_resolution: int = Field(500, ge=1, description="cap on the longer side (px)")
    jpeg_quality: int = Field(90, ge=1, le=100, description="quality of JPEG-stored images")
    compress_probability: float = Field(
        0.5, ge=0.0, le=1.0, description="share of images stored as JPEG in proportion mode"
    )
    validation: ValidationParams = ValidationParams()


class TrackingParams(_Params):
    """Where MLflow runs go (the URI itself comes from MLFLOW_TRACKING_URI)."""

    experiment: str = "residual-attention"


def _one_line(exc: ValidationError, where: str) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join([where, *(str(p) for p in err["loc"])])
        problems.append(f"{field}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def parse(model: type[Model], values: dict, where: str) -> Model:
    """Build ``model`` from ``values``; a bad value becomes a one-line :class:`RanError`."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise RanError(f"invalid parameters: {_one_line(exc, where)}") from exc


def load_section(section: str, model: type[Model], path: Path = PARAMS_FILE) -> Model:
    """One section of ``params.yaml``, validated."""
    return parse(model, _read_params(path).get(section) or {}, section)


def _read_params(path: Path) -> dict:
    if not path.is_file():
        raise RanError(f"{path} not found; run from the repository root")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RanError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc


def with_source_override(params: IngestParams) -> IngestParams:
    """Apply ``RAN_INGEST_SOURCE`` (an environment override of ``ingest.source``)."""
    override = os.environ.get(SOURCE_ENV)
    return params.model_copy(update={"source": Path(override)}) if override else params


def cache_dir() -> Path:
    """Where downloads and derived tables are kept between runs (``RAN_CACHE``, ~/.cache/ran)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ran")


class NoiseParams(_Params):
    """Which labels of the train split are made wrong, and how (the paper's Sec. 4.1 study).

    ``symmetric`` is the paper's definition: a label stays with probability 1 - rate and
    moves to each other class with probability rate / (K - 1). ``pair`` moves every label
    of a class to one fixed other class with probability rate. ``none`` keeps every label.
    """

    kind: Literal["none", "symmetric", "pair"] = Field(
        "none", description="none | symmetric (paper: to each other class alike) | pair"
    )
    rate: float = Field(
        0.0, ge=0, le=1, description="noise level r: share of each class's labels moved"
    )
    pairs: Literal["next", "cifar10"] = Field(
        "next",
        description="pair: the class each class flips to: next (c → c+1) | cifar10 (truck → "
        "automobile, bird → airplane, deer → horse, cat ↔ dog; other classes stay)",
    )
    exact: bool = Field(
        False, description="flip exactly round(rate × n) labels of each class, not sampled"
    )
    tolerance: float = Field(
        0.01, gt=0, le=1, description="validation: allowed |achieved - requested| rate"
    )
    seed: int = Field(0, description="seeds which labels flip and where they go")

    @model_validator(mode="after")
    def _none_is_clean(self) -> NoiseParams:
        if self.kind == "none" and self.rate != 0:
            raise ValueError(
                f"kind none keeps every label: rate must be 0, not {self.rate} "
                "(pick kind symmetric or pair for noise)"
            )
        return self


class PriorParams(_Params):
    """The attention prior: a frozen self-supervised ViT's [CLS] attention over its patches,
    one map per record (the ``vitmask`` network's second input)."""

    vit: str = Field(
        "vit_small_patch8_224.dino",
        description="timm ViT: vit_small_patch8_224.dino (DINO ViT-S/8) | vit_base_patch8_224.dino",
    )
    vit_weights: Path | None = Field(
        None, description="local weights file (.safetensors/.pth); unset: timm downloads them"
    )
    init: Literal["pretrained", "trained", "random", "constant"] = Field(
        "pretrained",
        description="pretrained (published weights: timm's download or --vit-weights) | trained "
        "(the ViT `ran-cli pretrain` trained here: --vit-weights names its vit.safetensors) | "
        "random (seeded random weights: runs anywhere, but the prior then carries no "
        "information) | constant (every weight 1/(h*w) on the ViT's grid: the vitmask study's "
        "control)",
    )
    size: int = Field(224, ge=8, description="ViT input side (px), a multiple of its patch")
    aggregate: Literal["mean", "max"] = Field(
        "mean", description="how the heads' maps become one: mean | max"
    )
    batch_size: int = Field(256, ge=1, description="images per ViT forward pass")
    samples: int = Field(8, ge=0, description="train images drawn beside their maps")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda[:N]"
    )
    num_workers: int = Field(2, ge=1, description="FFCV loader threads")
    seed: int = Field(0, description="seeds the random weights of init random")

    @model_validator(mode="after")
    def _trained_has_weights(self) -> PriorParams:
        if self.init == "trained" and self.vit_weights is None:
            raise ValueError(
                "init trained reads the ViT `ran-cli pretrain` wrote: pass its vit.safetensors "
                "as vit_weights (--vit-weights)"
            )
        return self


class PretrainParams(_Params):
    """DINO self-distillation of a ViT on an ingest output's train images (labels unread):
    the prior's ViT, trained here. Defaults are the DINO paper's ViT-S recipe (a GPU job);
    ``quick.pretrain`` in params.yaml is the 2-core CPU one (docs/vitmask.md)."""

    vit: str = Field(
        "ran_vit_small_patch16_224",
        description="timm ViT to train: ran_vit_tiny6_patch8_32 (CPU) | ran_vit_small_patch16_224 "
        "| ran_vit_small_patch8_224 | … (ran/prior/vits.py)",
    )
    size: int = Field(224, ge=8, description="global views' side (px): the ViT's input")
    local_size: int = Field(96, ge=8, description="local views' side (px)")
    local_views: int = Field(10, ge=0, description="local views per image (multi-crop)")
    global_scale: tuple[float, float] = Field(
        (0.25, 1.0), description="share of the image a global view covers: min, max"
    )
    local_scale: tuple[float, float] = Field(
        (0.05, 0.25), description="share of the image a local view covers: min, max"
    )
    blur: bool = Field(True, description="Gaussian blur in the views (DINO's; off for 32 px)")
    out_dim: int = Field(65536, ge=2, description="DINO head's output dimension (prototypes)")
    hidden_dim: int = Field(2048, ge=1, description="DINO head's hidden width")
    bottleneck_dim: int = Field(256, ge=1, description="DINO head's bottleneck width")
    norm_last_layer: bool = Field(False, description="weight-normalise the head's last layer")
    head_batch_norm: bool = Field(
        False,
        description="batch norm in the head's MLP (DINO's ViT recipe has none; the CPU "
        "recipe uses it: docs/vitmask.md)",
    )
    batch_size: int = Field(512, ge=2, description="images per step")
    epochs: float = Field(100, gt=0, description="passes over the train split")
    warmup_epochs: float = Field(10, ge=0, description="linear learning-rate warm-up")
    lr: float = Field(5e-4, gt=0, description="AdamW peak lr per 256 images (scaled by batch)")
    min_lr: float = Field(1e-6, ge=0, description="lr at the end of the cosine decay")
    weight_decay: tuple[float, float] = Field(
        (0.04, 0.4), description="weight decay: start, end (cosine)"
    )
    momentum_teacher: float = Field(
        0.996, ge=0, lt=1, description="teacher EMA momentum at the start (cosine to 1)"
    )
    teacher_temp: tuple[float, float] = Field(
        (0.04, 0.07), description="teacher temperature: start, after the warm-up"
    )
    teacher_temp_epochs: float = Field(30, ge=0, description="teacher temperature warm-up")
    student_temp: float = Field(0.1, gt=0, description="student temperature")
    freeze_last_layer_epochs: float = Field(
        1, ge=0, description="epochs the head's last layer stays fixed"
    )
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth of the student")
    clip_grad: float = Field(0.0, ge=0, description="gradient norm clip (0: off)")
    knn_k: int = Field(20, ge=1, description="k-NN evaluation: neighbours")
    knn_temperature: float = Field(0.07, gt=0, description="k-NN evaluation: vote temperature")
    knn_every: int = Field(
        0, ge=0, description="steps between k-NN evaluations for the curve (0: at the end only)"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="as training's: bf16/fp16 autocast on a GPU, bf16 on CPUs that have it"
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda[:N]"
    )
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    log_every: int = Field(20, ge=1, description="steps between logged metrics")
    num_workers: int = Field(2, ge=1, description="FFCV loader threads")
    seed: int = Field(0, description="seeds weights, order and views")

    @model_validator(mode="after")
    def _ordered_ranges(self) -> PretrainParams:
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must be shares 0 < min <= max <= 1, not {low}, {high}")
        return self


Family = Literal["attention", "resnet", "plain", "vitmask"]
Schedule = Literal["step", "cosine", "onecycle", "linear"]
PROFILES = ("paper", "quick")
# a family's usual depth
DEFAULT_DEPTHS = {"attention": 92, "resnet": 164, "plain": 8, "vitmask": 8}


class TrainParams(_Params):
    """How a network is trained: the paper's recipe by default (``profile: paper``).

    ``iterations`` and ``milestones`` left unset follow the data, as the paper states them:
    CIFAR 160k iterations with the learning rate divided by 10 at 64k and 96k; ImageNet 530k,
    divided at 200k, 400k and 500k.
    """

    @model_validator(mode="before")
    @classmethod
    def _family_depth(cls, values: Any) -> Any:
        """An unset depth is the family's usual one (ResNet-164, ResNet-8 for vitmask)."""
        family = values.get("family", "attention") if isinstance(values, dict) else None
        if family in DEFAULT_DEPTHS and values.get("depth") is None:
            values = {**values, "depth": DEFAULT_DEPTHS[family]}
        return values

    family: Family = Field(
        "attention",
        description="network family: attention | resnet | plain (airbench94's network: "
        "attention-8 without its attention modules) | vitmask (needs a prior)",
    )
    depth: int = Field(
        92,
        ge=1,
        description="network depth (e.g. 56, 92); unset: the family's usual one (attention "
        "92, resnet 164, vitmask 8)",
    )
    attention: Literal["mixed", "channel", "spatial"] = Field(
        "mixed", description="attention function: mixed | channel | spatial"
    )
    learning: Literal["arl", "nal"] = Field(
        "arl", description="arl: attention residual learning (1+M)*T | nal: naive M*T"
    )
    mask: Literal["encoder-decoder", "local"] = Field(
        "encoder-decoder", description="mask branch: encoder-decoder | local convolutions"
    )
    width: float = Field(1.0, gt=0, le=4, description="multiplier on every layer's width")
    mask_strength: float = Field(
        1.0, ge=0, le=1, description="vitmask: strength a of the prior's masks (0: ResNet-8)"
    )
    upsample: int | None = Field(
        None,
        ge=8,
        description="small images (CIFAR): train and test at this side, bicubic-upsampled "
        "after augmentation (the vitmask report: 224); unset: the stored side",
    )
    iterations: int | None = Field(
        None, ge=1, description="optimizer steps in all; unset: the paper's for the data"
    )
    batch_size: int = Field(64, ge=1, description="images per step (all processes together)")
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    schedule: Schedule = Field(
        "step",
        description="step (÷10 at milestones) | cosine (with warm-up) | onecycle | linear "
        "(airbench94's: from 0.2·lr up to lr over the warm-up, then down to 0.07·lr)",
    )
    milestones: list[int] | None = Field(
        None, description="step schedule: iterations where lr is divided by 10"
    )
    warmup: int = Field(0, ge=0, description="cosine, linear: warm-up iterations")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (Nesterov) | adamw")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum / AdamW beta1")
    nesterov: bool = Field(True, description="Nesterov momentum for SGD")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay")
    norm_lr_scale: float = Field(
        1.0,
        gt=0,
        description="learning-rate multiplier of BatchNorm parameters, their weight decay "
        "divided alike (airbench94: 64)",
    )
    freeze_norm_scale: bool = Field(
        False, description="keep every BatchNorm scale at 1, learn only its shift (airbench94)"
    )
    lookahead: bool = Field(
        False,
        description="airbench94's lookahead: every 5 steps the weights move to an EMA of "
        "themselves whose decay grows to 1 over training",
    )
    crop_padding: int = Field(
        4, ge=0, description="small images: pixels of padding for the random translate crop"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing (0: off)")
    mixup: float = Field(0.0, ge=0, description="mixup Beta(a, a) parameter a (0: off)")
    random_erasing: float = Field(
        0.0, ge=0, le=1, description="probability of random erasing per image (0: off)"
    )
    min_side: int | None = Field(
        None,
        ge=8,
        description="progressive resizing: train at this side first, growing to the full "
        "side between ramp_start and ramp_end (unset: always the full side)",
    )
    ramp_start: float = Field(0.2, ge=0, le=1, description="share of iterations at min_side")
    ramp_end: float = Field(
        0.85, ge=0, le=1, description="share of iterations where the side is full"
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda[:N]"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on GPUs that have it, else fp16 (+grad scaler); on a CPU bf16 "
        "where it computes bf16 natively (AVX-512 BF16, AMX), else fp32",
    )
    channels_last: bool = Field(True, description="channels-last memory format")
    compile: bool = Field(False, description="torch.compile the model")
    holdout: int = Field(
        0, ge=0, description="train records held out (equal per class) for model selection"
    )
    eval_every: int = Field(1000, ge=1, description="iterations between held-out evaluations")
    checkpoint_every: int = Field(1000, ge=1, description="iterations between checkpoints")
    log_every: int = Field(50, ge=1, description="iterations between logged metrics")
    num_workers: int = Field(2, ge=1, description="FFCV loader threads")
    seed: int = Field(0, description="seeds weights, order, augmentation and hold-out")
    log_model: bool = Field(
        True, description="log the final network to the run as an MLflow image model"
    )
    register_model: bool = Field(
        True, description="register the logged model in MLflow's registry (needs log_model)"
    )


class EvaluateParams(_Params):
    """How a trained model is scored on the test split (``val.beton``)."""

    image_size: int | None = Field(
        None, ge=8, description="test-time side (px); unset: the training size (paper: 320)"
    )
    flip: bool = Field(False, description="average the predictions of the image and its mirror")
    translate: bool = Field(
        False,
        description="also average over the image shifted one pixel up-left and down-right "
        "(airbench94's test-time augmentation; with flip, their mirrors too)",
    )
    batch_size: int = Field(256, ge=1, description="images per forward pass")
    masks: int = Field(8, ge=0, description="test images whose attention masks are drawn")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda[:N]"
    )
    num_workers: int = Field(2, ge=1, description="FFCV loader threads")


def resolve_profile(profile: str, has_gpu: bool) -> str:
    """``auto`` becomes ``paper`` on a machine with a GPU and ``quick`` without one."""
    if profile == "auto":
        return "paper" if has_gpu else "quick"
    if profile not in PROFILES:
        raise RanError(f"unknown profile {profile!r}; valid profiles: auto, {', '.join(PROFILES)}")
    return profile


def profile_values(section: str, profile: str, path: Path = PARAMS_FILE) -> dict:
    """The quick profile's overlay of ``section`` (``params.yaml``'s ``quick.<section>``);
    nothing for the paper profile."""
    if profile != "quick":
        return {}
    return dict((_read_params(path).get("quick") or {}).get(section) or {})


def profiled_section(
    section: str,
    model: type[Model],
    profile: str,
    path: Path = PARAMS_FILE,
    *overlays: dict,
) -> Model:
    """``params.yaml``'s ``section``, with the profile's overlay laid over it, then
    ``overlays`` in order (a study's settings, a cell's)."""
    values = {**(_read_params(path).get(section) or {}), **profile_values(section, profile, path)}
    for overlay in overlays:
        values |= overlay
    return parse(model, values, section)


class StudySeeds(_Params):
    """How many seeds every cell of a study runs (``studies.<profile>.seeds``)."""

    seeds: int = Field(
        1, ge=1, strict=True, description="runs of each cell, seed k offsetting train and noise"
    )


def study_seeds(profile: str, path: Path = PARAMS_FILE) -> int:
    """``params.yaml``'s ``studies.<profile>.seeds`` (1 when unset), validated: a bad count
    is one line naming the key."""
    values = (_read_params(path).get("studies") or {}).get(profile) or {}
    seeds = {"seeds": values["seeds"]} if "seeds" in values else {}
    return parse(StudySeeds, seeds, f"studies.{profile}").seeds


def study_overlay(
    section: str, profile: str, path: Path = PARAMS_FILE, study: str | None = None
) -> dict:
    """``params.yaml``'s ``studies.<profile>.<section>``: what every study cell of that
    profile changes in ``section`` (the quick profile's shorter runs, for instance); with
    ``study``, ``studies.<study>.<profile>.<section>``: what that study's profile changes."""
    studies = _read_params(path).get("studies") or {}
    if study is not None:
        studies = studies.get(study) or {}
    return dict((studies.get(profile) or {}).get(section) or {})
