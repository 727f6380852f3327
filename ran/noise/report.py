"""What a noise draw did: achieved rate, the empirical transition matrix, per-class flips,
and the Great Expectations checks that the draw is what was asked for."""

from __future__ import annotations

from typing import Any

import numpy as np

from ran.config import NoiseParams
from ran.data.validate import ValidationReport, check_frames
from ran.noise.corrupt import flippable, transition_matrix

STARVED_BELOW = 0.5  # symmetric noise: a class with under half its expected noisy count


def counts_matrix(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]``: records of clean class i labelled j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (clean, noisy), 1)
    return counts


def noise_report(
    clean: np.ndarray, noisy: np.ndarray, params: NoiseParams, classes: list[str]
) -> dict[str, Any]:
    """``report.json``: requested vs achieved rate (over the records of the classes the noise
    can move: all of them but for ``pairs: cifar10``), the empirical and the requested
    transition matrix, and per class its records, flips and noisy count."""
    counts = counts_matrix(clean, noisy, len(classes))
    records = counts.sum(1)
    flipped = records - np.diag(counts)
    moves = flippable(params, classes)
    eligible = int(records[moves].sum())
    return {
        "kind": params.kind,
        "requested_rate": params.rate,
        "achieved_rate": float(flipped[moves].sum() / eligible) if eligible else 0.0,
        "flipped_records": int(flipped.sum()),
        "records": int(records.sum()),
        "seed": params.seed,
        "exact": params.exact,
        "pairs": params.pairs if params.kind == "pair" else None,
        "classes": classes,
        "transition_matrix": (counts / np.maximum(records, 1)[:, None]).round(6).tolist(),
        "requested_transition_matrix": transition_matrix(params, classes).round(6).tolist(),
        "per_class": [
            {
                "class": name,
                "records": int(records[c]),
                "flipped": int(flipped[c]),
                "noisy_count": int(counts[:, c].sum()),
            }
            for c, name in enumerate(classes)
        ],
    }


def validate_noise(
    clean: np.ndarray, noisy: np.ndarray, params: NoiseParams, classes: list[str]
) -> ValidationReport:
    """Every noisy label in range and one per record; the achieved rate within
    ``params.tolerance`` of the requested one; with symmetric noise, no class starved (each
    keeps at least half the records Q says it should end with)."""
    import great_expectations.expectations as gxe
    import pandas as pd

    k = len(classes)
    labels = pd.DataFrame(
        {"index": np.arange(len(noisy)), "noisy": noisy, "flipped": (noisy != clean).astype(int)}
    )
    moves = flippable(params, classes)
    low, high = params.rate - params.tolerance, params.rate + params.tolerance
    batches = {
        "labels": (
            labels,
            [
                gxe.ExpectTableRowCountToEqual(value=len(clean)),
                gxe.ExpectColumnValuesToBeUnique(column="index"),
                gxe.ExpectColumnValuesToBeBetween(column="noisy", min_value=0, max_value=k - 1),
            ],
        ),
        "flippable": (
            labels[moves[clean]].reset_index(drop=True),
            [gxe.ExpectColumnMeanToBeBetween(column="flipped", min_value=low, max_value=high)],
        ),
    }
    if params.kind == "symmetric":
        expected = transition_matrix(params, classes).T @ np.bincount(clean, minlength=k)
        noisy_count = np.bincount(noisy, minlength=k)
        per_class = pd.DataFrame({"class": classes, "share_of_expected": noisy_count / expected})
        batches["classes"] = (
            per_class,
            [
                gxe.ExpectColumnValuesToBeBetween(
                    column="share_of_expected", min_value=STARVED_BELOW
                )
            ],
        )
    return check_frames("noise", batches)
