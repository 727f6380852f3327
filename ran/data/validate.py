"""Great Expectations checks on what the stages produce (:func:`check_frames`), and the
ingest suite.

The ingest checks run on the per-record manifest (one row per record: split, index, label, size,
content hash, and what the written beton says of the same record), so they cover both the
source (sizes, classes, duplicates across splits) and the write (the beton holds exactly
the records, labels and sizes the source gave).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ran.config import ValidationParams


@dataclass
class ValidationReport:
    success: bool
    failures: list[str]  # one readable line per failed expectation
    results: dict[str, Any]  # the full GE results, JSON-ready, per batch (ingest: split)

    def as_json(self) -> dict[str, Any]:
        return {"success": self.success, "failures": self.failures, "batches": self.results}

    def summary(self) -> str:
        return "; ".join(self.failures) if self.failures else "all expectations met"


def _ingest_expectations(
    split: str, count: int, num_classes: int, bounds: ValidationParams
) -> list[Any]:
    import great_expectations.expectations as gxe

    expectations = [
        gxe.ExpectTableRowCountToEqual(value=count),
        gxe.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=num_classes - 1),
        gxe.ExpectColumnDistinctValuesToEqualSet(
            column="label", value_set=list(range(num_classes))
        ),
        gxe.ExpectColumnValuesToBeUnique(column="index"),
        gxe.ExpectColumnValuesToBeBetween(column="index", min_value=0, max_value=count - 1),
    ]
    expectations += [
        gxe.ExpectColumnValuesToBeBetween(
            column=side, min_value=bounds.min_side, max_value=bounds.max_side
        )
        for side in ("height", "width")
    ]
    expectations += [
        gxe.ExpectColumnPairValuesToBeEqual(column_A=column, column_B=f"beton_{column}")
        for column in ("index", "label", "height", "width")
    ]
    if split == "val":
        expectations.append(
            gxe.ExpectColumnSumToBeBetween(
                column="cross_split_duplicate",
                min_value=0,
                max_value=bounds.max_cross_split_duplicates,
            )
        )
    return expectations


def _describe(split: str, result: dict) -> str:
    config = result["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    where = kwargs.get("column") or kwargs.get("column_A") or "table"
    observed = result["result"].get("observed_value", result["result"].get("unexpected_count"))
    return f"{split}: {config['type']}({where}) failed, observed {observed}"


def check_frames(name: str, batches: dict[str, tuple[Any, list[Any]]]) -> ValidationReport:
    """Run each batch's expectations on its pandas DataFrame (``{batch: (frame,
    expectations)}``) in an ephemeral Great Expectations context: no files, no network."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no network calls from a stage
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas(name).add_dataframe_asset("frame")
    definition = asset.add_batch_definition_whole_dataframe("batch")
    results, failures = {}, []
    for batch_name, (frame, expectations) in batches.items():
        suite = gx.ExpectationSuite(name=f"{name}-{batch_name}")
        for expectation in expectations:
            suite.add_expectation(expectation)
        batch = definition.get_batch(batch_parameters={"dataframe": frame})
        outcome = batch.validate(suite).to_json_dict()
        results[batch_name] = outcome
        failures += [_describe(batch_name, r) for r in outcome["results"] if not r["success"]]
    return ValidationReport(success=not failures, failures=failures, results=results)


def validate_manifest(
    manifest: Any, declared: dict[str, int], num_classes: int, bounds: ValidationParams
) -> ValidationReport:
    """Run the expectations on each split of ``manifest`` (a pandas DataFrame)."""
    return check_frames(
        "ingest",
        {
            split: (
                manifest[manifest["split"] == split].reset_index(drop=True),
                _ingest_expectations(split, count, num_classes, bounds),
            )
            for split, count in declared.items()
        },
    )
