"""Registry of model variants: every network is a row of data behind one builder.

Family modules (:mod:`ran.models.ran`, :mod:`ran.models.resnet`) call :func:`register`
at import; :mod:`ran.models` imports them, so importing the package fills the registry.
Users reach a variant by name (``attention92-cifar``) or by ``(family, depth, dataset)``,
the form ``ran-cli train --depth 92`` needs; a wrong key is a one-line :class:`RanError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ran.errors import RanError

INPUT_SIZES = {"cifar": 32, "imagenet": 224}
DEFAULT_CLASSES = {"cifar": 10, "imagenet": 1000}


@dataclass(frozen=True)
class Variant:
    """One registered network: its key, how to build it, and the reference numbers it
    must reproduce (``ref_params`` in millions, ``ref_macs`` in GMACs at ``input_size``;
    ``None`` where no published number exists)."""

    family: str
    depth: int
    dataset: str
    build: Callable[..., nn.Module]
    ref_params: float | None = None
    ref_macs: float | None = None
    ref_source: str = ""

    @property
    def name(self) -> str:
        return f"{self.family}{self.depth}-{self.dataset}"

    @property
    def input_size(self) -> int:
        return INPUT_SIZES[self.dataset]

    @property
    def default_classes(self) -> int:
        return DEFAULT_CLASSES[self.dataset]


_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add a variant; a duplicate name is a programming error, not a user error."""
    if variant.dataset not in INPUT_SIZES:
        raise ValueError(f"unknown dataset {variant.dataset!r} for {variant.family}")
    if variant.name in _REGISTRY:
        raise ValueError(f"variant {variant.name} registered twice")
    _REGISTRY[variant.name] = variant
    return variant


def list_variants() -> list[Variant]:
    """All registered variants, in registration order."""
    return list(_REGISTRY.values())


def get_variant(name: str) -> Variant:
    """The variant called ``name`` (e.g. ``attention92-cifar``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(_REGISTRY)
        raise RanError(f"unknown model {name!r}; valid models: {valid}") from None


def find_variant(family: str, depth: int, dataset: str) -> Variant:
    """The variant for ``(family, depth, dataset)``; errors name the valid choices."""
    families = sorted({v.family for v in _REGISTRY.values()})
    if family not in families:
        raise RanError(f"unknown model family {family!r}; valid families: {', '.join(families)}")
    datasets = sorted({v.dataset for v in _REGISTRY.values() if v.family == family})
    if dataset not in datasets:
        raise RanError(
            f"no {family} model for dataset {dataset!r}; valid datasets: {', '.join(datasets)}"
        )
    depths = sorted(
        v.depth for v in _REGISTRY.values() if (v.family, v.dataset) == (family, dataset)
    )
    if depth not in depths:
        valid = ", ".join(map(str, depths))
        raise RanError(f"unknown depth {depth} for {family} ({dataset}); valid depths: {valid}")
    return _REGISTRY[f"{family}{depth}-{dataset}"]


def build_model(name: str, num_classes: int | None = None, **options: Any) -> nn.Module:
    """Build the variant ``name`` with ``num_classes`` outputs (default: its dataset's).

    ``options`` go to the family's builder (``arl``, ``attention``, ``mask``, ``width``
    for the attention family); an option a family does not take is a :class:`RanError`.
    """
    variant = get_variant(name)
    accepted = set(inspect.signature(variant.build).parameters) - {"num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise RanError(
            f"option(s) {', '.join(unknown)} do not apply to {name}; "
            f"valid options: {', '.join(sorted(accepted)) or 'none'}"
        )
    return variant.build(num_classes or variant.default_classes, **options)
