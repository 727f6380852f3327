"""The paper's four CIFAR-10 studies, and the vitmask report's, as data: each a grid of
rows × columns, every cell a setting of the ``noise`` and ``train`` parameters (and, for a
study over several data sets, a ``data`` entry naming the data set and whether the cell
reads the ViT prior) and the published top-1 error for it.

The first column of every study is the one the paper finds best in each row (Attention-92
over ResNet-164, ARL over NAL, mixed attention, the encoder-decoder mask, the strongest ViT
mask), so the report can say, row by row, whether a run reproduced the paper's ordering
(against the columns with a published number). A study may also name a control (the
vitmask study's a = 1 on a constant map): a comparison the paper does not make, judged the
same way. ``studies/dvc.yaml`` lists the same cell names (a test keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ran.errors import RanError

Setting = dict[str, dict[str, Any]]  # params.yaml section -> the values this axis sets
CLEAN: Setting = {"noise": {"kind": "none", "rate": 0.0}}


@dataclass(frozen=True)
class Axis:
    """One row or column: a slug for file and stage names, a label for tables, a setting,
    and what the quick profile sets instead (``quick``: its stand-in for a paper network,
    named ``quick_label``), since the paper's networks do not train on a CPU in minutes."""

    slug: str
    label: str
    setting: Setting
    quick: Setting = field(default_factory=dict)
    quick_label: str = ""


@dataclass(frozen=True)
class Cell:
    """One training + evaluation run of a study."""

    name: str
    row: str
    column: str
    setting: Setting
    paper_error: float | None
    quick: Setting = field(default_factory=dict)

    def setting_for(self, profile: str) -> Setting:
        """What the cell sets under ``profile``: the quick profile's stand-ins laid over."""
        return _merge(self.setting, self.quick) if profile == "quick" else self.setting


@dataclass(frozen=True)
class Control:
    """A comparison the paper does not make, per row: column ``first`` (a slug) against
    column ``control``, the same network with one thing taken away. ``claim`` holds where
    the control's error is the higher (the report's verdict, as for the paper's orderings)."""

    first: str
    control: str
    claim: str


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    source: str
    row_label: str
    claim: str
    rows: tuple[Axis, ...]
    columns: tuple[Axis, ...]
    paper: tuple[tuple[float | None, ...], ...]  # paper[row][column]: top-1 error (%)
    control: Control | None = None

    @property
    def grid(self) -> list[list[Cell]]:
        """The cells row by row, in the columns' order (the shape of the paper's table)."""
        return [
            [
                Cell(
                    f"{row.slug}-{column.slug}",
                    row.label,
                    column.label,
                    _merge(row.setting, column.setting),
                    self.paper[r][c],
                    _merge(row.quick, column.quick),
                )
                for c, column in enumerate(self.columns)
            ]
            for r, row in enumerate(self.rows)
        ]

    @property
    def cells(self) -> list[Cell]:
        return [cell for row in self.grid for cell in row]

    def control_cells(self) -> list[tuple[Cell, Cell]]:
        """Per row, the control's (first cell, control cell); none without a control."""
        if self.control is None:
            return []
        slugs = [column.slug for column in self.columns]
        first, control = slugs.index(self.control.first), slugs.index(self.control.control)
        return [(row[first], row[control]) for row in self.grid]

    def stand_ins(self) -> list[tuple[str, str]]:
        """(paper network, the quick profile's stand-in) for every axis that has one."""
        axes = (*self.rows, *self.columns)
        return [(axis.label, axis.quick_label) for axis in axes if axis.quick_label]

    def cell(self, name: str) -> Cell:
        for cell in self.cells:
            if cell.name == name:
                return cell
        valid = ", ".join(c.name for c in self.cells)
        raise RanError(f"study {self.name} has no cell {name!r}; valid cells: {valid}")


def _merge(*settings: Setting) -> Setting:
    merged: Setting = {}
    for setting in settings:
        for section, values in setting.items():
            merged[section] = {**merged.get(section, {}), **values}
    return merged


def _attention(depth: int, **train: Any) -> Setting:
    return {"train": {"family": "attention", "depth": depth, **train}}


# The quick profile's stand-ins. Attention-8 (the quick profile's network) for an attention
# network whose depth is not what a study varies, and Plain-8 (the same table without its
# attention modules: airbench94's network) for ResNet-164, so a quick cell takes minutes.
ATTENTION8 = {"quick": _attention(8), "quick_label": "Attention-8"}
PLAIN8 = {"quick": {"train": {"family": "plain", "depth": 8}}, "quick_label": "Plain-8"}
# ARL vs NAL varies the depth of the bottleneck networks, which Attention-8 cannot: their
# quick cells keep the paper's networks at half width with the previous quick profile's
# recipe (one-cycle SGD at batch 128, progressive resizing 16 -> 32 px; about one epoch).
BOTTLENECK_QUICK: dict[str, Any] = {
    "width": 0.5,
    "iterations": 400,
    "batch_size": 128,
    "lr": 0.2,
    "schedule": "onecycle",
    "warmup": 0,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "norm_lr_scale": 1.0,
    "freeze_norm_scale": False,
    "lookahead": False,
    "label_smoothing": 0.1,
    "crop_padding": 4,
    "min_side": 16,
    "ramp_start": 0.4,
    "ramp_end": 0.9,
}


def _single_row(depth: int) -> tuple[Axis, ...]:
    setting = _merge(CLEAN, _attention(depth))
    return (Axis(f"attention{depth}", f"Attention-{depth}", setting, **ATTENTION8),)


STUDIES = {
    study.name: study
    for study in [
        Study(
            name="noise",
            title="Robustness to label noise (CIFAR-10 top-1 error, %)",
            source="arXiv:1704.06904v1, Table 5",
            row_label="noise level",
            claim="Attention-92 beats ResNet-164 at every noise level",
            rows=tuple(
                Axis(
                    f"r{int(rate * 100)}",
                    f"{rate:.0%}",
                    {"noise": {"kind": "symmetric", "rate": rate}},
                )
                for rate in (0.1, 0.3, 0.5, 0.7)
            ),
            columns=(
                Axis("attention92", "Attention-92", _attention(92), **ATTENTION8),
                Axis(
                    "resnet164",
                    "ResNet-164",
                    {"train": {"family": "resnet", "depth": 164}},
                    **PLAIN8,
                ),
            ),
            paper=((5.15, 5.93), (5.79, 6.61), (7.27, 8.35), (15.75, 17.21)),
        ),
        Study(
            name="arl-nal",
            title="Attention residual vs naive attention learning (CIFAR-10 top-1 error, %)",
            source="arXiv:1704.06904v1, Table 3",
            row_label="network",
            claim="ARL beats NAL at every depth, and more so the deeper the network",
            rows=tuple(
                Axis(
                    f"attention{depth}",
                    f"Attention-{depth}",
                    _merge(CLEAN, _attention(depth)),
                    quick={"train": BOTTLENECK_QUICK},
                )
                for depth in (56, 92, 128, 164)
            ),
            columns=(
                Axis("arl", "ARL", {"train": {"learning": "arl"}}),
                Axis("nal", "NAL", {"train": {"learning": "nal"}}),
            ),
            paper=((5.52, 5.89), (4.99, 5.35), (4.44, 5.57), (4.31, 7.18)),
        ),
        Study(
            name="attention",
            title="Attention type (CIFAR-10 top-1 error, %)",
            source="arXiv:1704.06904v1, Table 1",
            row_label="network",
            claim="mixed attention beats channel and spatial attention",
            rows=_single_row(56),
            columns=tuple(
                Axis(kind, f"{kind} attention", {"train": {"attention": kind}})
                for kind in ("mixed", "channel", "spatial")
            ),
            paper=((5.52, 6.24, 6.33),),
        ),
        Study(
            name="mask",
            title="Mask structure (CIFAR-10 top-1 error, %)",
            source="arXiv:1704.06904v1, Table 4",
            row_label="network",
            claim="the encoder-decoder mask beats local convolutions",
            rows=_single_row(56),
            columns=(
                Axis("encoder-decoder", "encoder-decoder", {"train": {"mask": "encoder-decoder"}}),
                Axis("local", "local convolutions", {"train": {"mask": "local"}}),
            ),
            paper=((5.52, 6.48),),
        ),
    ]
}


# The vitmask report's recipe (C. Wang; both profiles, params.yaml's studies.vitmask.<profile>
# adds the input size and the length): AdamW (beta 0.9/0.999), weight decay 5e-4, batch 128,
# random erasing of 2-33 % of the area, a 45,000/5,000 split. Its learning rate, 0.2, would
# blow AdamW up (its steps are about lr in size, whatever the gradient's scale); 1e-3, AdamW's
# own default, with a cosine decay is used, and `-S` reaches any other (docs/vitmask.md).
VITMASK_RECIPE: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 128,
    "schedule": "cosine",
    "warmup": 0,
    "label_smoothing": 0.0,
    "mixup": 0.0,
    "random_erasing": 0.5,
    "min_side": None,
    "width": 1.0,
    "holdout": 5000,
    # not the quick profile's airbench94 recipe, whatever the profile
    "norm_lr_scale": 1.0,
    "freeze_norm_scale": False,
    "lookahead": False,
    "crop_padding": 4,
}


def _vitmask(strength: float, prior: str = "vit") -> Axis:
    """A masked-network column: ``prior`` ``vit`` reads the ViT's maps (data/prior/<data>),
    ``constant`` the control's constant map on the same grid (data/prior/<data>-constant)."""
    train = {"family": "vitmask", "depth": 8, "mask_strength": strength, **VITMASK_RECIPE}
    slug, label = f"a{strength:g}", f"a = {strength:g}"
    if prior == "constant":
        slug, label = f"{slug}-constant", f"{label}, constant map"
    return Axis(slug, label, {"train": train, "data": {"prior": prior}})


VITMASK = Study(
    name="vitmask",
    title="ViT-guided residual attention (top-1 error, %)",
    source="C. Wang, Refining Residual Mappings Using Regions of High Attention (accuracy "
    "83.3/86.6/87.0 and 41.1/42.9/43.4, as errors)",
    row_label="data",
    claim="the stronger the ViT prior's masks, the lower the error (a = 1 < 0.5 < 0)",
    rows=tuple(
        Axis(name, label, _merge(CLEAN, {"data": {"dataset": name}}))
        for name, label in (("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"))
    ),
    columns=(
        *(_vitmask(a) for a in (1.0, 0.5, 0.0)),
        _vitmask(1.0, prior="constant"),  # the control: no information in the map
        Axis(
            "attention56",
            "Attention-56 (same budget)",
            {"train": {"family": "attention", "depth": 56, **VITMASK_RECIPE}},
        ),
    ),
    paper=((13.0, 13.4, 16.7, None, None), (56.6, 57.1, 58.9, None, None)),
    control=Control(
        "a1",
        "a1-constant",
        "the ViT prior's information helps beyond the attention branch and its gates "
        "(a = 1 beats a = 1 on a constant map)",
    ),
)
STUDIES[VITMASK.name] = VITMASK


def get_study(name: str) -> Study:
    try:
        return STUDIES[name]
    except KeyError:
        raise RanError(f"unknown study {name!r}; valid studies: {', '.join(STUDIES)}") from None
