"""``ran-cli``: the command-line front door to the library.

Thin on purpose: each command parses its options, calls one library function and prints
the result. Heavy imports (torch, ffcv, mlflow) happen inside the commands, so
``ran-cli --help`` answers at once.
"""

from __future__ import annotations

import typer

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


@app.command()
def models(
    json_output: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List every registered model variant with its parameters and MACs (vs the paper).

    Takes no user input that can be wrong, so there is no RanError to report here.
    """
    import json

    from ran.models import model_table

    rows = model_table()
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
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
    Console().print(table)
