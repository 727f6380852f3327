"""``ran-cli``: the command-line front door to the library.

Thin on purpose: each command parses its options, calls one library function and prints
the result. Heavy imports (torch, ffcv, mlflow) happen inside the commands, so
``ran-cli --help`` answers at once. A :class:`~ran.errors.RanError` is printed as one line
on stderr with exit code 1, never as a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ran.errors import RanError

app = typer.Typer(
    name="ran-cli",
    help="Residual Attention Network pipeline: ingest data, inspect models, train, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a RanError into ``error: <message>`` on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RanError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def main() -> None:
    """Residual Attention Network (Wang et al., CVPR 2017) pipeline."""


@app.command()
@user_errors
def ingest(
    dataset: Annotated[
        str,
        typer.Option(help="cifar10 | cifar100 | imagenet | tiny-imagenet | imagefolder"),
    ] = "cifar10",
    source: Annotated[
        Path | None,
        typer.Option(
            help="CIFAR python archive/folder, or an ImageFolder tree (or .tar/.tar.gz) with "
            "train/ and val/ or test/; omit to download CIFAR (needs network). "
            "Default: $RAN_INGEST_SOURCE.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder for the betons and meta.json")] = Path(
        "data/ingest"
    ),
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="skip unreadable images (listed in meta.json)")
    ] = False,
    seed: Annotated[int, typer.Option(help="seed of FFCV's per-image JPEG/raw choice")] = 0,
    num_workers: Annotated[int, typer.Option(help="processes decoding source images")] = 2,
    write_mode: Annotated[
        str, typer.Option(help="auto | raw | proportion | jpg | smart (auto: raw for small images)")
    ] = "auto",
    max_resolution: Annotated[int, typer.Option(help="cap on the longer side (px)")] = 500,
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality of compressed images")] = 90,
    compress_probability: Annotated[
        float, typer.Option(help="share of images stored as JPEG in proportion mode")
    ] = 0.5,
    max_cross_split_duplicates: Annotated[
        int, typer.Option(help="val images allowed to equal a train image exactly")
    ] = 10,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "residual-attention",
) -> None:
    """Ingest a data set into FFCV files: OUT/train.beton, OUT/val.beton, OUT/meta.json.

    Images are validated with Great Expectations and the run is logged to MLflow
    (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db at the repository root).
    """
    from ran.config import IngestParams, parse, with_source_override
    from ran.data.ingest import tracked_ingest

    values = {
        "dataset": dataset,
        "source": source,
        "skip_bad": skip_bad,
        "seed": seed,
        "num_workers": num_workers,
        "write_mode": write_mode,
        "max_resolution": max_resolution,
        "jpeg_quality": jpeg_quality,
        "compress_probability": compress_probability,
        "validation": {"max_cross_split_duplicates": max_cross_split_duplicates},
    }
    params = parse(IngestParams, values, "ingest")
    if source is None:
        params = with_source_override(params)
    meta = tracked_ingest(params, out, experiment)
    counts = {split: info["count"] for split, info in meta["splits"].items()}
    print(json.dumps({"out": str(out), "num_classes": meta["num_classes"], "counts": counts}))


if __name__ == "__main__":
    app()
