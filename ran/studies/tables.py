"""The paper's four CIFAR-10 studies, and the vitmask report's, as data: each a grid of
rows × columns, every cell a setting of the ``noise`` and ``train`` parameters (and, for a
study over several data sets, a ``data`` entry naming the data set and whether the cell
reads the ViT prior) and the published top-1 error for it.

The first column of every study is the one the paper finds best in each row (Attention-92
over ResNet-164, ARL over NAL, mixed attention, the encoder-decoder mask, the strongest ViT
mask), so the report can say, row by row, whether a run reproduced the paper's ordering
(against the columns with a published number). ``studies/dvc.yaml`` lists the
same cell names (a test keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ran.errors import RanError

Setting = dict[str, dict[str, Any]]  # params.yaml section -> the values this axis sets
CLEAN: Setting = {"noise": {"kind": "none", "rate": 0.0}}


@dataclass(frozen=True)
class Axis:
    """One row or column: a slug for file and stage names, a label for tables, a setting."""

    slug: str
    label: str
    setting: Setting


@dataclass(frozen=True)
class Cell:
    """One training + evaluation run of a study."""

    name: str
    row: str
    column: str
    setting: Setting
    paper_error: float | None


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
                )
                for c, column in enumerate(self.columns)
            ]
            for r, row in enumerate(self.rows)
        ]

    @property
    def cells(self) -> list[Cell]:
        return [cell for row in self.grid for cell in row]

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


def _single_row(depth: int) -> tuple[Axis, ...]:
    return (Axis(f"attention{depth}", f"Attention-{depth}", _merge(CLEAN, _attention(depth))),)


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
                Axis("attention92", "Attention-92", _attention(92)),
                Axis("resnet164", "ResNet-164", {"train": {"family": "resnet", "depth": 164}}),
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
                Axis(f"attention{depth}", f"Attention-{depth}", _merge(CLEAN, _attention(depth)))
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
}


def _vitmask(strength: float) -> Axis:
    train = {"family": "vitmask", "depth": 8, "mask_strength": strength, **VITMASK_RECIPE}
    return Axis(f"a{strength:g}", f"a = {strength:g}", {"train": train, "data": {"prior": True}})


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
        Axis(
            "attention56",
            "Attention-56 (same budget)",
            {"train": {"family": "attention", "depth": 56, **VITMASK_RECIPE}},
        ),
    ),
    paper=((13.0, 13.4, 16.7, None), (56.6, 57.1, 58.9, None)),
)
STUDIES[VITMASK.name] = VITMASK


def get_study(name: str) -> Study:
    try:
        return STUDIES[name]
    except KeyError:
        raise RanError(f"unknown study {name!r}; valid studies: {', '.join(STUDIES)}") from None
