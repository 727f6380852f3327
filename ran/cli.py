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
