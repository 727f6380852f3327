"""The noise stage: an ingest output's train labels → ``labels.npy`` + a report, tracked.

Only labels are written, indexed by record (training reads them with ``--labels``): the
images are never copied, which at ImageNet scale would cost a second beton of hundreds of GB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ran.config import NoiseParams
from ran.data.beton import read_records
from ran.data.meta import read_meta
from ran.data.sources import sha256_file
from ran.errors import RanError
from ran.figures import matrix_png
from ran.noise.corrupt import corrupt
from ran.noise.report import counts_matrix, noise_report, validate_noise
from ran.outputs import staged_output
from ran.tracking import describe, log_file_dataset, log_metrics, log_outputs, tracked_stage

OUTPUTS = ("labels.npy", "report.json", "transition.png", "validation.json")


def clean_labels(data: Path) -> tuple[np.ndarray, list[str]]:
    """The train split's labels in record-index order, and the class names."""
    meta = read_meta(data)
    records = read_records(data / "train.beton")
    if not np.array_equal(records["index"], np.arange(len(records["index"]))):
        raise RanError(f"{data / 'train.beton'} is not in record-index order; re-run ingest")
    return records["label"], list(meta["classes"])


def make_noisy_labels(params: NoiseParams, data: Path, out: Path) -> dict[str, Any]:
    """Draw the noisy labels of ``data``'s train split into ``out`` (all or nothing);
    returns ``report.json``. A draw that fails validation is an error, and nothing is
    written."""
    clean, classes = clean_labels(data)
    noisy = corrupt(clean, params, classes)
    check = validate_noise(clean, noisy, params, classes)
    if not check.success:
        raise RanError(
            f"noisy labels failed validation: {check.summary()} (with few records, set "
            "noise.exact true or a wider noise.tolerance)"
        )
    report = noise_report(clean, noisy, params, classes)
    with staged_output(out) as tmp:
        np.save(tmp / "labels.npy", noisy)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "validation.json").write_text(json.dumps(check.as_json(), indent=2) + "\n")
        title = (
            f"{params.kind} noise: requested {params.rate:.0%}, "
            f"achieved {report['achieved_rate']:.1%}"
        )
        counts = counts_matrix(clean, noisy, len(classes))
        matrix_png(counts, classes, tmp / "transition.png", title, "noisy label", "clean class")
    return report


def tracked_noise(
    params: NoiseParams,
    data: Path,
    out: Path,
    experiment: str,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`make_noisy_labels` inside an MLflow run holding ``out``."""
    logged = {**params.model_dump(mode="json"), "data": str(data), "out": str(out)}
    with tracked_stage("noise", experiment, logged, out, tags=tags):
        report = make_noisy_labels(params, data, out)
        log_metrics(
            {
                "achieved_rate": report["achieved_rate"],
                "flipped_records": report["flipped_records"],
                "records": report["records"],
            }
        )
        log_outputs(out, OUTPUTS[1:])
        describe(
            f"Writes the train labels of `{data}` into `{out}`: {params.kind} noise at a "
            f"requested {params.rate:.0%}, {report['achieved_rate']:.1%} of "
            f"{report['records']} labels changed (seed {params.seed})."
        )
        labels = out / "labels.npy"
        log_file_dataset(labels, "noisy-labels", sha256_file(labels), context="labels")
    return report
