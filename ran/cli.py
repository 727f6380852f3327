"""``ran-cli``: the command-line front door to the library.

Thin on purpose: each command parses its options, calls one library function and prints
the result. Heavy imports (torch, ffcv, mlflow) happen inside the commands, so
``ran-cli --help`` answers at once. A :class:`~ran.errors.RanError` is printed as one line
on stderr with exit code 1, never as a traceback (:func:`ran.errors.user_errors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ran.config import (
    SOURCE_ENV,
    IngestParams,
    TrackingParams,
    ValidationParams,
    parse,
    with_source_override,
)
from ran.errors import user_errors

app = typer.Typer(
    name="ran-cli",
    help="Residual Attention Network pipeline: ingest data, inspect models, train, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Residual Attention Network (Wang et al., CVPR 2017) pipeline."""


INGEST = IngestParams.model_fields


def _option(name: str, *flags: str) -> Any:
    """A Typer option whose help text is the parameter's own description in ran.config."""
    return typer.Option(*flags, help=INGEST[name].description)


@app.command()
@user_errors
def ingest(
    dataset: Annotated[str, _option("dataset")] = INGEST["dataset"].default,
    source: Annotated[
        Path | None,
        typer.Option(
            help="CIFAR python archive/folder, or an ImageFolder tree (or .tar/.tar.gz) with "
            "train/ and val/ or test/; omit to download CIFAR (needs network). "
            f"Default: ${SOURCE_ENV}.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/ingest"),
    skip_bad: Annotated[bool, _option("skip_bad", "--skip-bad")] = INGEST["skip_bad"].default,
    seed: Annotated[int, _option("seed")] = INGEST["seed"].default,
    num_workers: Annotated[int, _option("num_workers")] = INGEST["num_workers"].default,
    write_mode: Annotated[str, _option("write_mode")] = INGEST["write_mode"].default,
    max_resolution: Annotated[int, _option("max_resolution")] = INGEST["max_resolution"].default,
    jpeg_quality: Annotated[int, _option("jpeg_quality")] = INGEST["jpeg_quality"].default,
    compress_probability: Annotated[float, _option("compress_probability")] = INGEST[
        "compress_probability"
    ].default,
    max_cross_split_duplicates: Annotated[
        int, typer.Option(help="val images allowed to equal a train image exactly")
    ] = ValidationParams.model_fields["max_cross_split_duplicates"].default,
    experiment: Annotated[
        str, typer.Option(help="MLflow experiment")
    ] = TrackingParams.model_fields["experiment"].default,
) -> None:
    """Ingest a data set into FFCV files: OUT/train.beton, OUT/val.beton, OUT/meta.json.

    Images are validated with Great Expectations and the run is logged to MLflow
    (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db at the repository root).
    """
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


@app.command()
def models(
    json_output: Annotated[
        bool, typer.Option("--json", help="print a JSON list instead of a table")
    ] = False,
) -> None:
    """List every registered model variant: input size, depth, params and MACs vs the paper."""
    from ran.model_table import model_table

    rows = model_table()
    if json_output:
        print(json.dumps(rows, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Registered models (MACs at the listed input size, batch 1)")
    for column in ("name", "input", "depth", "params (M)", "paper", "GMACs", "paper"):
        table.add_column(column, justify="left" if column == "name" else "right", no_wrap=True)
    for row in rows:
        table.add_row(
            row["name"],
            str(row["input_size"]),
            str(row["depth"]),
            f"{row['params'] / 1e6:.2f}",
            "-" if row["ref_params_m"] is None else f"{row['ref_params_m']:.1f}",
            f"{row['macs'] / 1e9:.3f}",
            "-" if row["ref_macs_g"] is None else f"{row['ref_macs_g']:.1f}",
        )
    console = Console()
    Console(width=max(console.width, 100)).print(table)  # seven columns need 100


if __name__ == "__main__":
    app()
