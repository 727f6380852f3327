"""A study's report: its cells' evaluate runs, found in MLflow by tag, as a table and a plot
in the paper's shape, our top-1 error beside the paper's for every cell.

A cell with no finished run shows as missing: the report never fills a hole. Each row says
whether it reproduced the paper's ordering (the study's first column best).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ran.outputs import staged_output
from ran.studies.tables import Study
from ran.tracking import describe, log_metrics, log_outputs, tracked_stage, tracking_uri

UI = "http://127.0.0.1:5000"  # where `ran-cli ui` serves a local store
OUTPUTS = ("report.md", "report.png", "results.json")
# Beside them, the report's own dvc.yaml: DVC's metrics and plots of a study that has a report.
# studies/dvc.yaml cannot declare them (DVC fails `dvc metrics show` and `dvc plots show` on a
# declared file that does not exist: every study not yet run); a dvc.yaml that exists only
# with its report adds them to both commands once the study has run (DVCLive's way).
DVC_YAML = """\
# Written with this report by ran/studies/report.py: `dvc metrics show` and `dvc plots show`
# list the study's results once it has run (studies/dvc.yaml says why they are declared here).
metrics:
  - results.json
plots:
  - report.png
"""


@dataclass(frozen=True)
class CellResult:
    """A cell's newest finished evaluate run (``error`` in %), or ``None`` fields if none."""

    error: float | None
    run_id: str | None
    link: str | None


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def collect(study: Study, experiment: str, profile: str) -> dict[str, CellResult]:
    """For every cell of ``study``, the newest FINISHED evaluate run tagged with the study,
    the cell and ``profile`` in ``experiment``."""
    from mlflow import MlflowClient

    uri = tracking_uri()
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = []
    if found is not None:
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=(
                f"tags.study = '{study.name}' AND tags.stage = 'evaluate' AND "
                f"tags.`study.profile` = '{profile}' AND attributes.status = 'FINISHED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=10_000,
        )
    results = {cell.name: CellResult(None, None, None) for cell in study.cells}
    for run in runs:
        name = run.data.tags.get("study.cell")
        error = run.data.metrics.get("top1_error_pct")
        if name in results and results[name].run_id is None and error is not None:
            link = run_link(uri, run.info.experiment_id, run.info.run_id)
            results[name] = CellResult(error, run.info.run_id, link)
    return results


def _fmt(value: float | None, absent: str = "missing") -> str:
    return absent if value is None else f"{value:.2f}"


def ordering(study: Study, results: dict[str, CellResult]) -> list[bool | None]:
    """Per row: does its first column have a lower error than every other column with a
    published number, as in the paper? ``None`` where one of those cells is missing."""
    verdicts = []
    for row in study.grid:
        compared = [row[0], *(cell for cell in row[1:] if cell.paper_error is not None)]
        errors = [results[cell.name].error for cell in compared]
        if any(e is None for e in errors):
            verdicts.append(None)
        else:
            verdicts.append(all(errors[0] < e for e in errors[1:]))
    return verdicts


def markdown(study: Study, results: dict[str, CellResult], profile: str) -> str:
    """The table (ours | paper per column, and the ordering verdict per row), then links."""
    columns = [c.label for c in study.columns]
    header = [study.row_label]
    for label in columns:
        header += [f"{label}: ours", f"{label}: paper"]
    header.append("paper's ordering")
    lines = [
        f"# {study.title}",
        "",
        f"Study `{study.name}`, profile `{profile}`; paper: {study.source}. "
        f"The paper's claim: {study.claim}.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + " |",
    ]
    verdicts = ordering(study, results)
    for row, cells, verdict in zip(study.rows, study.grid, verdicts, strict=True):
        values = [row.label]
        for cell in cells:
            values += [_fmt(results[cell.name].error), _fmt(cell.paper_error, "-")]
        values.append({True: "holds", False: "does not hold", None: "missing cells"}[verdict])
        lines.append("| " + " | ".join(values) + " |")
    held = sum(v is True for v in verdicts)
    complete = sum(v is not None for v in verdicts)
    lines += ["", f"The paper's ordering holds in {held} of {complete} complete rows."]
    lines += ["", "Runs (evaluate; its training run is linked from it):", ""]
    for cell in study.cells:
        result = results[cell.name]
        where = f"[{result.run_id}]({result.link})" if result.link else "missing"
        lines.append(f"- `{cell.name}` ({cell.row}, {cell.column}): {where}")
    return "\n".join(lines) + "\n"


def plot(study: Study, results: dict[str, CellResult], profile: str, path: Path) -> None:
    """Grouped bars: per row, each column's error (ours), the paper's as a black bar-wide
    tick over it; a missing cell has no bar and is labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_rows, n_cols = len(study.rows), len(study.columns)
    width = 0.8 / n_cols
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * n_rows * n_cols + 4), 4))
    x = np.arange(n_rows)
    grid = study.grid
    for c, column in enumerate(study.columns):
        cells = [row[c] for row in grid]
        ours = [results[cell.name].error for cell in cells]
        offset = x - 0.4 + width * (c + 0.5)
        bars = ax.bar(offset, [e or 0.0 for e in ours], width * 0.9, color=f"C{c}")
        bars.set_label(f"{column.label} (ours)")
        labels = ["missing" if e is None else f"{e:.1f}" for e in ours]
        ax.bar_label(bars, labels, fontsize=7)
        paper = [cell.paper_error for cell in cells]
        known = [i for i, e in enumerate(paper) if e is not None]
        ax.hlines(
            [paper[i] for i in known],
            offset[known] - width * 0.45,
            offset[known] + width * 0.45,
            colors="black",
            lw=2,
        )
    ax.plot([], [], color="black", lw=2, label="paper")
    ax.set_xticks(x, [row.label for row in study.rows])
    ax.set_xlabel(study.row_label)
    ax.set_ylabel("top-1 error (%)")
    ax.set_title(f"{study.title}\nprofile {profile}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_json(study: Study, results: dict[str, CellResult]) -> dict[str, Any]:
    """DVC's metrics file: every cell's error (null when missing) beside the paper's."""
    verdicts = ordering(study, results)
    return {
        "cells": {
            cell.name: {
                "top1_error_pct": results[cell.name].error,
                "paper_top1_error_pct": cell.paper_error,
                "run_id": results[cell.name].run_id,
            }
            for cell in study.cells
        },
        "missing_cells": sum(r.error is None for r in results.values()),
        "ordering_holds": sum(v is True for v in verdicts),
        "complete_rows": sum(v is not None for v in verdicts),
    }


def write_report(study: Study, experiment: str, profile: str, out: Path) -> dict[str, Any]:
    """Collect the study's runs and write ``out/{report.md, report.png, results.json}``, and
    ``out/dvc.yaml`` declaring the last two as DVC's metrics and plots (all or nothing);
    returns ``results.json``."""
    results = collect(study, experiment, profile)
    summary = results_json(study, results)
    with staged_output(out) as tmp:
        (tmp / "report.md").write_text(markdown(study, results, profile))
        plot(study, results, profile, tmp / "report.png")
        (tmp / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "dvc.yaml").write_text(DVC_YAML)
    return summary


def tracked_report(
    study: Study,
    experiment: str,
    profile: str,
    out: Path,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`write_report` inside an MLflow run (``stage`` report, tagged with the study),
    its files logged as artifacts."""
    logged = {"study": study.name, "profile": profile, "out": str(out)}
    run_tags = {**(tags or {}), "study": study.name, "study.profile": profile}
    with tracked_stage("report", experiment, logged, out, tags=run_tags):
        summary = write_report(study, experiment, profile, out)
        log_metrics(
            {k: float(summary[k]) for k in ("missing_cells", "ordering_holds", "complete_rows")}
        )
        log_outputs(out, OUTPUTS)
        describe(
            f"Collects the {study.name} study's cells ({profile} profile) into `{out}`: "
            f"{summary['missing_cells']} cells missing, the paper's ordering holding in "
            f"{summary['ordering_holds']} of {summary['complete_rows']} complete rows."
        )
    return summary
