"""A study's report: its cells' evaluate runs, found in MLflow by tag, as a table and a plot
in the paper's shape, our mean top-1 error over the seeds (± its spread) beside the paper's
for every cell.

A cell with no finished run shows as missing: the report never fills a hole. Each row says
whether it reproduced the paper's ordering (the study's first column best): holds, reversed
or inconclusive, by the paired bootstrap of :mod:`ran.studies.verdict` over the seeds and
the test images (each run's ``predictions.csv``). A study with a control (the vitmask
study's a = 1 on a constant map) gets one more line: the control's verdict, judged the same
way, with the means, spreads and intervals it rests on.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ran.config import PARAMS_FILE, study_seeds
from ran.errors import RanError
from ran.outputs import staged_output
from ran.studies.tables import Cell, Study
from ran.tracking import describe, log_metrics, log_outputs, tracked_stage, tracking_uri

if TYPE_CHECKING:
    import numpy as np

    from ran.studies.verdict import Comparison

UI = "http://127.0.0.1:5000"  # where `ran-cli ui` serves a local store
OUTPUTS = ("report.md", "report.png", "results.json")
PREDICTIONS = "predictions.csv"  # an evaluate run's artifact: index, actual, predicted
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
class SeedRun:
    """One seed's newest finished evaluate run of a cell. ``right``: whether each test
    image, in the order of ``index``, was classified right (``None``: the run has no
    ``predictions.csv``)."""

    seed: int
    error: float  # top-1 error, %
    images: int | None  # test images scored
    run_id: str
    link: str
    index: np.ndarray | None = None
    right: np.ndarray | None = None


@dataclass(frozen=True)
class CellResult:
    """A cell's seeds' runs, in seed order; none: the cell is missing."""

    runs: tuple[SeedRun, ...] = ()

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def error(self) -> float | None:
        """The mean top-1 error (%) over the seeds."""
        return statistics.fmean(r.error for r in self.runs) if self.runs else None

    @property
    def spread(self) -> float | None:
        """The standard deviation of the error over the seeds; with one seed, which has no
        spread over seeds, the binomial standard error of its error on the test set (``None``
        when the test set's size is unknown)."""
        if len(self.runs) > 1:
            return statistics.stdev(r.error for r in self.runs)
        if self.runs and self.runs[0].images:
            share = self.runs[0].error / 100
            return 100 * math.sqrt(share * (1 - share) / self.runs[0].images)
        return None

    @property
    def spread_kind(self) -> str | None:
        if self.spread is None:
            return None
        return "sd" if len(self.runs) > 1 else "binomial_se"

    def per_image(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The test images' indices and a seeds × images array of which each seed got right
        (``None`` if a seed's run has no predictions); ``name`` is the cell's, for errors."""
        import numpy as np

        if not self.runs or any(r.right is None for r in self.runs):
            return None
        index = self.runs[0].index
        if any(not np.array_equal(r.index, index) for r in self.runs):
            raise RanError(f"the seeds of cell {name} were scored on different test images")
        return index, np.vstack([r.right for r in self.runs])


@dataclass(frozen=True)
class Row:
    """A row's verdict: per other column with a published number (by cell name), its
    comparison with the first (``None``: a cell or a seed's predictions is missing)."""

    comparisons: dict[str, Comparison | None]
    verdict: str | None  # holds | reversed | inconclusive; None: not every comparison made


@dataclass(frozen=True)
class ControlResult:
    """The study's control: per row (by label), its two cells and their comparison (the
    control's error minus the first's; ``None``: a cell or a seed's predictions is missing),
    and the verdict over the rows (``None``: not every comparison made)."""

    rows: dict[str, tuple[Cell, Cell, Comparison | None]]
    verdict: str | None


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def collect(study: Study, experiment: str, profile: str, seeds: int) -> dict[str, CellResult]:
    """For every cell of ``study``, the newest FINISHED evaluate run of each of its seeds
    0 … ``seeds`` - 1 tagged with the study, the cell and ``profile`` in ``experiment``, with
    its per-image results. A run without a ``study.seed`` tag (made before cells had seeds)
    is seed 0, which it equals."""
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
    names = {cell.name for cell in study.cells}
    newest: dict[tuple[str, int], Any] = {}
    for run in runs:
        key = (run.data.tags.get("study.cell"), int(run.data.tags.get("study.seed", "0")))
        if key[0] in names and key[1] < seeds and "top1_error_pct" in run.data.metrics:
            newest.setdefault(key, run)
    with tempfile.TemporaryDirectory(prefix="ran-report-") as tmp:
        found_runs = {
            key: _seed_run(client, uri, key[1], run, Path(tmp))
            for key, run in sorted(newest.items())
        }
    return {
        cell.name: CellResult(tuple(r for (name, _), r in found_runs.items() if name == cell.name))
        for cell in study.cells
    }


def _seed_run(client: Any, uri: str, seed: int, run: Any, folder: Path) -> SeedRun:
    metrics, run_id = run.data.metrics, run.info.run_id
    index, right = _predictions(client, run_id, folder / run_id) or (None, None)
    return SeedRun(
        seed=seed,
        error=metrics["top1_error_pct"],
        images=int(metrics["test_records"]) if "test_records" in metrics else None,
        run_id=run_id,
        link=run_link(uri, run.info.experiment_id, run_id),
        index=index,
        right=right,
    )


def _predictions(client: Any, run_id: str, folder: Path) -> tuple[np.ndarray, ...] | None:
    """The run's test images' indices and whether each was classified right, in index order
    (its ``predictions.csv``); ``None`` when it has none."""
    import numpy as np
    from mlflow.exceptions import MlflowException

    folder.mkdir(parents=True)
    try:
        local = client.download_artifacts(run_id, PREDICTIONS, str(folder))
    except (MlflowException, OSError):
        return None
    with open(local, newline="") as f:
        rows = list(csv.DictReader(f))
    index = np.array([int(r["index"]) for r in rows], dtype=np.int64)
    right = np.array([r["actual"] == r["predicted"] for r in rows], dtype=bool)
    order = np.argsort(index, kind="stable")
    return index[order], right[order]


def compared(row: list[Cell]) -> list[Cell]:
    """The cells of a row the first is compared with: those with a published number."""
    return [cell for cell in row[1:] if cell.paper_error is not None]


def judge(study: Study, results: dict[str, CellResult]) -> list[Row]:
    """Per row: the paired bootstrap (:func:`ran.studies.verdict.compare`) of every compared
    cell against the first, and the row's verdict (:func:`ran.studies.verdict.row_verdict`)."""
    from ran.studies.verdict import row_verdict

    rows = []
    for row in study.grid:
        comparisons = {cell.name: paired(results, row[0], cell) for cell in compared(row)}
        made = [c for c in comparisons.values() if c is not None]
        verdict = row_verdict([c.verdict for c in made]) if len(made) == len(comparisons) else None
        rows.append(Row(comparisons, verdict))
    return rows


def paired(results: dict[str, CellResult], first: Cell, other: Cell) -> Comparison | None:
    """The paired bootstrap (:func:`ran.studies.verdict.compare`) of ``other``'s error minus
    ``first``'s; ``None`` when either lacks a seed's predictions."""
    import numpy as np

    from ran.studies.verdict import compare

    ours = results[first.name].per_image(first.name)
    theirs = results[other.name].per_image(other.name)
    if ours is None or theirs is None:
        return None
    if not np.array_equal(ours[0], theirs[0]):
        raise RanError(
            f"cells {first.name} and {other.name} were scored on different test images: re-run one"
        )
    return compare(ours[1], theirs[1])


def judge_control(study: Study, results: dict[str, CellResult]) -> ControlResult | None:
    """The study's control (``None``: it has none), per row and over the rows, by the rule
    of the paper's orderings (:func:`ran.studies.verdict.row_verdict`)."""
    from ran.studies.verdict import row_verdict

    if study.control is None:
        return None
    rows = {
        axis.label: (first, control, paired(results, first, control))
        for axis, (first, control) in zip(study.rows, study.control_cells(), strict=True)
    }
    made = [c for _, _, c in rows.values() if c is not None]
    verdict = row_verdict([c.verdict for c in made]) if len(made) == len(rows) else None
    return ControlResult(rows, verdict)


def _fmt(value: float | None, absent: str = "missing") -> str:
    return absent if value is None else f"{value:.2f}"


def _ours(result: CellResult) -> str:
    """``mean ± spread (n=seeds)``."""
    if result.error is None:
        return "missing"
    spread = "" if result.spread is None else f" ± {result.spread:.2f}"
    return f"{result.error:.2f}{spread} (n={result.seeds})"


def _tally(rows: list[Row]) -> dict[str, int]:
    verdicts = [row.verdict for row in rows]
    return {
        "ordering_holds": verdicts.count("holds"),
        "ordering_reversed": verdicts.count("reversed"),
        "ordering_inconclusive": verdicts.count("inconclusive"),
        "complete_rows": sum(v is not None for v in verdicts),
    }


def _stand_ins(study: Study, profile: str) -> list[str]:
    """The quick profile's line naming the networks its cells train instead of the paper's."""
    pairs = study.stand_ins() if profile == "quick" else []
    if not pairs:
        return []
    named = "; ".join(f"{paper} → {quick}" for paper, quick in pairs)
    return [
        f"The quick profile trains stand-ins for the paper's networks: {named} "
        '(docs/studies/index.md, "The quick profile").',
        "",
    ]


def markdown(
    study: Study,
    results: dict[str, CellResult],
    rows: list[Row],
    profile: str,
    seeds: int,
    control: ControlResult | None = None,
) -> str:
    """The table (ours | paper per column, the verdict per row), the control's verdict line
    (``control``, else :func:`judge_control`'s), the test and each comparison, then links."""
    control = control or judge_control(study, results)
    header = [study.row_label]
    for column in study.columns:
        header += [f"{column.label}: ours", f"{column.label}: paper"]
    header.append("paper's ordering")
    lines = [
        f"# {study.title}",
        "",
        f"Study `{study.name}`, profile `{profile}` ({seeds} seed{'s' * (seeds > 1)} per "
        f"cell); paper: {study.source}. The paper's claim: {study.claim}.",
        "",
        "Ours: the mean top-1 error over the cell's n seeds ± the standard deviation over "
        "them; with one seed (n=1), ± is the binomial standard error of that run's error on "
        "the test set, sqrt(e(1 - e)/N).",
        "",
        *_stand_ins(study, profile),
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + " |",
    ]
    for axis, cells, row in zip(study.rows, study.grid, rows, strict=True):
        values = [axis.label]
        for cell in cells:
            values += [_ours(results[cell.name]), _fmt(cell.paper_error, "-")]
        values.append(row.verdict or "missing")
        lines.append("| " + " | ".join(values) + " |")
    tally = _tally(rows)
    lines += [
        "",
        f"The paper's ordering holds in {tally['ordering_holds']}, is reversed in "
        f"{tally['ordering_reversed']} and is inconclusive in {tally['ordering_inconclusive']} "
        f"of {tally['complete_rows']} judged rows.",
        "",
        *([control_line(study, results, control), ""] if control else []),
        *_test_section(study, rows),
        "",
        "Runs (evaluate, per seed; its training run is linked from it):",
        "",
    ]
    for cell in study.cells:
        runs = results[cell.name].runs
        where = ", ".join(f"seed {r.seed} [{r.run_id}]({r.link})" for r in runs) or "missing"
        lines.append(f"- `{cell.name}` ({cell.row}, {cell.column}): {where}")
    return "\n".join(lines) + "\n"


def control_line(study: Study, results: dict[str, CellResult], control: ControlResult) -> str:
    """The control's verdict in one line: its claim, the verdict over the rows, and per row
    the two cells' mean ± spread and the bootstrap interval of their difference."""
    assert study.control is not None
    parts = []
    for label, (first, other, comparison) in control.rows.items():
        if comparison is None:
            parts.append(f"{label}: missing")
            continue
        parts.append(
            f"{label}: `{first.name}` {_ours(results[first.name])} vs `{other.name}` "
            f"{_ours(results[other.name])}, difference {comparison.difference:+.2f} "
            f"[{comparison.low:+.2f}, {comparison.high:+.2f}] {comparison.verdict}"
        )
    return (
        f"**Control:** {study.control.claim}: **{control.verdict or 'missing'}** "
        f"({'; '.join(parts)})."
    )


def _test_section(study: Study, rows: list[Row]) -> list[str]:
    """How the verdicts are reached, and every comparison's numbers."""
    from ran.studies.verdict import DESCRIPTION

    lines = [
        "## The verdicts",
        "",
        "Each row compares its first column (the paper's best) with every other column with "
        f"a published number. The test: a {DESCRIPTION}. It carries both the seed-to-seed spread "
        "and the test set's sampling error; inconclusive means our runs cannot tell the two "
        "cells apart. "
        "A row holds if every comparison holds, is reversed if any is reversed, and is "
        "inconclusive otherwise; missing: a cell, or a seed's predictions.csv, is missing.",
        *(
            [
                "",
                "The control line compares the same way, per row, the control's error minus "
                "its first cell's (difference, 95% interval, verdict: holds if the control "
                "is worse), and its verdict over the rows by the same rule.",
            ]
            if study.control
            else []
        ),
        "",
        f"| {study.row_label} | comparison | difference (points) | 95% interval | verdict |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for axis, cells, row in zip(study.rows, study.grid, rows, strict=True):
        for cell in compared(cells):
            comparison = row.comparisons[cell.name]
            what = f"{cell.column} minus {cells[0].column}"
            if comparison is None:
                lines.append(f"| {axis.label} | {what} | missing | missing | missing |")
                continue
            lines.append(
                f"| {axis.label} | {what} | {comparison.difference:+.2f} | "
                f"[{comparison.low:+.2f}, {comparison.high:+.2f}] | {comparison.verdict} |"
            )
    return lines


def plot(study: Study, results: dict[str, CellResult], profile: str, path: Path) -> None:
    """Grouped bars: per row, each column's mean error (ours) with its spread as an error
    bar, the paper's as a black bar-wide tick over it; a missing cell has no bar and is
    labelled."""
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
        ours = [results[cell.name] for cell in cells]
        offset = x - 0.4 + width * (c + 0.5)
        heights = [r.error or 0.0 for r in ours]
        spreads = [np.nan if r.spread is None else r.spread for r in ours]
        bars = ax.bar(offset, heights, width * 0.9, color=f"C{c}", yerr=spreads, capsize=3)
        bars.set_label(f"{column.label} (ours)")
        ax.bar_label(bars, ["" if r.error is None else f"{r.error:.1f}" for r in ours],
                     label_type="center", fontsize=7)  # fmt: skip
        ax.bar_label(bars, ["missing" if r.error is None else "" for r in ours], fontsize=7)
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
    spread = "ours: mean over seeds ± sd (one seed: ± binomial SE)"
    ax.set_title(f"{study.title}\nprofile {profile}; {spread}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _comparison_json(comparison: Comparison | None) -> dict[str, Any] | None:
    if comparison is None:
        return None
    numbers = {k: getattr(comparison, k) for k in ("difference", "low", "high")}
    return {**numbers, "verdict": comparison.verdict}


def results_json(
    study: Study,
    results: dict[str, CellResult],
    rows: list[Row],
    control: ControlResult | None = None,
) -> dict[str, Any]:
    """DVC's metrics file: every cell's mean error, spread and seeds (null when missing)
    beside the paper's; every row's verdict and comparisons (the interval's bounds); and
    the control's (``control``, else :func:`judge_control`'s), for a study that has one."""
    from ran.studies.verdict import DESCRIPTION

    control = control or judge_control(study, results)
    extra = {}
    if control is not None and study.control is not None:
        extra["control"] = {
            "claim": study.control.claim,
            "verdict": control.verdict,
            "rows": {
                label: {
                    "first": first.name,
                    "control": other.name,
                    "comparison": _comparison_json(comparison),
                }
                for label, (first, other, comparison) in control.rows.items()
            },
        }
    return {
        "cells": {
            cell.name: {
                "top1_error_pct": results[cell.name].error,
                "top1_error_spread": results[cell.name].spread,
                "spread": results[cell.name].spread_kind,
                "seeds": results[cell.name].seeds,
                "paper_top1_error_pct": cell.paper_error,
                "run_ids": [r.run_id for r in results[cell.name].runs],
            }
            for cell in study.cells
        },
        "rows": {
            axis.label: {
                "verdict": row.verdict,
                "comparisons": {n: _comparison_json(c) for n, c in row.comparisons.items()},
            }
            for axis, row in zip(study.rows, rows, strict=True)
        },
        **extra,
        "test": DESCRIPTION,
        "missing_cells": sum(r.error is None for r in results.values()),
        **_tally(rows),
    }


def write_report(
    study: Study, experiment: str, profile: str, out: Path, path: Path = PARAMS_FILE
) -> dict[str, Any]:
    """Collect the study's runs (the seeds ``path``'s ``studies.<profile>.seeds`` asks for)
    and write ``out/{report.md, report.png, results.json}``, and ``out/dvc.yaml`` declaring
    the last two as DVC's metrics and plots (all or nothing); returns ``results.json``."""
    seeds = study_seeds(profile, path)
    results = collect(study, experiment, profile, seeds)
    rows = judge(study, results)
    control = judge_control(study, results)
    summary = results_json(study, results, rows, control)
    with staged_output(out) as tmp:
        (tmp / "report.md").write_text(markdown(study, results, rows, profile, seeds, control))
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
    counts = ("missing_cells", "ordering_holds", "ordering_reversed", "ordering_inconclusive")
    with tracked_stage("report", experiment, logged, out, tags=run_tags):
        summary = write_report(study, experiment, profile, out)
        log_metrics({k: float(summary[k]) for k in (*counts, "complete_rows")})
        log_outputs(out, OUTPUTS)
        describe(
            f"Collects the {study.name} study's cells ({profile} profile) into `{out}`: "
            f"{summary['missing_cells']} cells missing; of {summary['complete_rows']} judged "
            f"rows, the paper's ordering holds in {summary['ordering_holds']}, is reversed in "
            f"{summary['ordering_reversed']} and is inconclusive in "
            f"{summary['ordering_inconclusive']}."
        )
    return summary
