"""Ingestion: a source becomes ``train.beton``, ``val.beton``, ``meta.json``, the manifest
and the validation result, all or nothing.

Everything is written into a temporary folder beside the target and renamed into place at
the end, so a failure (bad image, failed expectation, Ctrl-C) never leaves half an output
for DVC or a later stage to pick up. ``kill -9`` cannot be caught: the temporary folder it
leaves is removed by the next tracked run into the same output (:mod:`ran.outputs`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ran.config import IngestParams, cache_dir
from ran.data.beton import (
    FIELDS,
    WriteSettings,
    import_ffcv,
    prepare_image,
    read_records,
    write_beton,
)
from ran.data.scan import ScanResult, scan_split
from ran.data.sources import SourceData, read_source, sha256_file
from ran.data.validate import validate_manifest
from ran.errors import RanError
from ran.outputs import publish_dir, temporary_sibling
from ran.progress import tracked
from ran.tracking import (
    describe,
    log_artifact,
    log_file_dataset,
    log_metrics,
    log_outputs,
    tracked_stage,
)

SPLITS = ("train", "val")
OUTPUTS = ("train.beton", "val.beton", "meta.json", "manifest.parquet", "validation.json")


class ValidationFailed(RanError):
    """The data was read and written, but an expectation failed; ``report`` holds the result."""

    def __init__(self, message: str, report: Path) -> None:
        super().__init__(message)
        self.report = report


def _check_bad(data: SourceData, scans: dict[str, ScanResult], skip_bad: bool) -> list[str]:
    bad = [f"{split}: {reason}" for split, scan in scans.items() for _, reason in scan.bad]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RanError(
            f"unreadable image in {data.origin}: {bad[0]}{more}; fix or remove it, or pass "
            "--skip-bad (ingest.skip_bad: true) to skip such images"
        )
    return bad


def _write_mode(params: IngestParams, scans: dict[str, ScanResult]) -> str:
    """``auto``: raw pixels when every image is small (CIFAR), else ffcv-imagenet's mix."""
    if params.write_mode != "auto":
        return params.write_mode
    largest = max(scan.max_side for scan in scans.values())
    return "raw" if largest <= params.raw_max_side else "proportion"


def _manifest(data: SourceData, scans: dict[str, ScanResult], betons: dict[str, Path]) -> Any:
    """One row per written record: what the source gave, and what the beton holds."""
    import pandas as pd

    frames = []
    for split in SPLITS:
        scan, keep = scans[split], scans[split].good
        source = data.splits[split]
        stored = read_records(betons[split])
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "index": np.arange(len(keep)),
                    "label": source.labels[keep].astype(np.int64),
                    "height": scan.height[keep],
                    "width": scan.width[keep],
                    "content_hash": [scan.content_hash[i] for i in keep],
                    "source": [source.name(int(i)) for i in keep],
                    **{f"beton_{k}": stored[k] for k in ("index", "label", "height", "width")},
                }
            )
        )
    manifest = pd.concat(frames, ignore_index=True)
    train_hashes = set(manifest.loc[manifest["split"] == "train", "content_hash"])
    manifest["cross_split_duplicate"] = (manifest["split"] == "val") & manifest[
        "content_hash"
    ].isin(train_hashes)
    return manifest


def _source_digest(data: SourceData, manifest: Any) -> str:
    """sha256 of the archive the data came in, else of every record's name, label and pixels."""
    if data.archive is not None:
        return sha256_file(data.archive)
    digest = hashlib.sha256()
    for row in manifest[["split", "source", "label", "content_hash"]].itertuples(index=False):
        digest.update("\t".join(map(str, row)).encode() + b"\n")
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def ingest(params: IngestParams, out: Path) -> dict[str, Any]:
    """Ingest ``params.source`` into ``out``; returns the content of ``meta.json``.

    Raises :class:`RanError` for bad input or failed validation. On failed validation
    ``out`` holds only ``validation.json``, so the failure can be read but not trained on.
    """
    tmp = temporary_sibling(out, "tmp")
    try:
        work = tmp / "work"  # extractions; downloads go to the cache, kept between runs
        data = read_source(
            params.dataset, params.source, cache_dir() if params.source is None else work
        )
        import_ffcv()  # once here, not in every forked decoding process
        prepare = partial(prepare_image, max_resolution=params.max_resolution)
        scans = {
            split: scan_split(
                data.splits[split],
                prepare,
                params.num_workers,
                tracked(f"decoding {split}", len(data.splits[split])),
            )
            for split in SPLITS
        }
        bad = _check_bad(data, scans, params.skip_bad)
        settings = WriteSettings(
            write_mode=_write_mode(params, scans),
            max_resolution=params.max_resolution,
            jpeg_quality=params.jpeg_quality,
            compress_probability=params.compress_probability,
            seed=params.seed,
            page_size=WriteSettings.page_size_for(max(s.max_pixels for s in scans.values())),
        )
        betons = {split: tmp / f"{split}.beton" for split in SPLITS}
        for split in SPLITS:
            good = scans[split].good
            write_beton(data.splits[split], good, betons[split], settings, params.num_workers)
        shutil.rmtree(work, ignore_errors=True)

        manifest = _manifest(data, scans, betons)
        declared = {split: len(data.splits[split]) - len(scans[split].bad) for split in SPLITS}
        report = validate_manifest(manifest, declared, len(data.classes), params.validation)
        _write_json(tmp / "validation.json", report.as_json())
        if not report.success:
            failed = temporary_sibling(out, "failed")
            (tmp / "validation.json").rename(failed / "validation.json")
            publish_dir(failed, out)
            raise ValidationFailed(
                f"validation failed: {report.summary()} (full result: {out / 'validation.json'})",
                out / "validation.json",
            )
        manifest.to_parquet(tmp / "manifest.parquet", index=False)
        mean, std = scans["train"].mean_std()
        meta = {
            "dataset": params.dataset,
            "num_classes": len(data.classes),
            "classes": data.classes,
            "wnids": data.wnids,
            "splits": {
                split: {
                    "count": declared[split],
                    "source_count": len(data.splits[split]),
                    "max_side": scans[split].max_side,
                    "beton": f"{split}.beton",
                    "sha256": sha256_file(betons[split]),
                }
                for split in SPLITS
            },
            "mean": mean,
            "std": std,
            "source": {"origin": data.origin, "sha256": _source_digest(data, manifest)},
            "skipped": bad,
            "cross_split_duplicates": int(manifest["cross_split_duplicate"].sum()),
            "ffcv": {
                **asdict(settings),
                "fields": list(FIELDS),
                "writer_workers": 1,
            },
            "validation": {"success": True, "file": "validation.json"},
        }
        _write_json(tmp / "meta.json", meta)
        publish_dir(tmp, out)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tracked_ingest(
    params: IngestParams, out: Path, experiment: str, tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """:func:`ingest` as a tracked stage (:func:`ran.tracking.tracked_stage`): params,
    counts, statistics, validation, datasets."""
    logged = {**params.model_dump(mode="json"), "out": str(out)}
    with tracked_stage("ingest", experiment, logged, out, tags=tags):
        try:
            meta = ingest(params, out)
        except ValidationFailed as exc:
            log_artifact(exc.report)
            log_metrics({"validation_success": 0})
            raise
        log_metrics(
            {
                "num_classes": meta["num_classes"],
                "train_count": meta["splits"]["train"]["count"],
                "val_count": meta["splits"]["val"]["count"],
                "skipped": len(meta["skipped"]),
                "cross_split_duplicates": meta["cross_split_duplicates"],
                "validation_success": 1,
                **{f"mean_{c}": v for c, v in zip("rgb", meta["mean"], strict=True)},
                **{f"std_{c}": v for c, v in zip("rgb", meta["std"], strict=True)},
            }
        )
        log_outputs(out, ("meta.json", "validation.json"))
        counts = {split: meta["splits"][split]["count"] for split in SPLITS}
        describe(
            f"Ingests {params.dataset} from {params.source or 'its official download'} into "
            f"`{out}`: {counts['train']} train and {counts['val']} test images of "
            f"{meta['num_classes']} classes, checked by Great Expectations."
        )
        for split in SPLITS:
            beton = out / meta["splits"][split]["beton"]
            digest = meta["splits"][split]["sha256"]
            log_file_dataset(beton, f"{params.dataset}-{split}", digest, context=split)
    return meta
