"""Typed parameters: one model per ``params.yaml`` section, shared by the CLI and DVC stages.

``params.yaml`` is the single source of defaults for DVC runs; the CLI takes the same
fields as options. Both go through these pydantic models, so a bad value gives the same
one-line error whichever door it came through.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    problems = [
        f"{where}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    ]
    return "; ".join(problems)


def parse(model: type[Model], values: dict, where: str) -> Model:
    """Build ``model`` from ``values``; a bad value becomes a one-line :class:`RanError`."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise RanError(f"invalid parameters: {_one_line(exc, where)}") from exc


def load_section(section: str, model: type[Model], path: Path = PARAMS_FILE) -> Model:
    """One section of ``params.yaml``, validated."""
    if not path.is_file():
        raise RanError(f"{path} not found; run from the repository root")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RanError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    return parse(model, values.get(section) or {}, section)


def with_source_override(params: IngestParams) -> IngestParams:
    """Apply ``RAN_INGEST_SOURCE`` (an environment override of ``ingest.source``)."""
    override = os.environ.get(SOURCE_ENV)
    return params.model_copy(update={"source": Path(override)}) if override else params


def cache_dir() -> Path:
    """Where downloads and derived tables are kept between runs (``RAN_CACHE``, ~/.cache/ran)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ran")
