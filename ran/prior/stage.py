"""The prior stage: an ingest output's images → one ViT [CLS]-attention map per record, tracked.

``OUT/train.npy`` and ``OUT/val.npy`` (float16, records × h × w, memory-mappable) are
indexed by record, like the noise stage's labels, so training reads a batch's maps by the
indices its loader yields and the images are never copied. The maps are computed on the
images as the loaders cut them (CIFAR-size: the stored image; ImageNet-size: training's
central square and evaluation's centre crop), so a map lies over the pixels it describes.
``report.json`` says which ViT, which weights and which data made them (training checks
the last), ``sample.png`` shows images beside their maps, ``validation.json`` holds the
Great Expectations results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ran.config import PriorParams
from ran.data.beton import LoaderSpec, make_loader
from ran.data.meta import read_meta
from ran.data.sources import sha256_file
from ran.data.validate import check_frames
from ran.devices import pick_device
from ran.errors import RanError
from ran.outputs import staged_output
from ran.prior.maps import map_statistics
from ran.prior.vit import PriorSource, prior_source
from ran.progress import progress_bar
from ran.tracking import describe, log_file_dataset, log_metrics, log_outputs, tracked_stage

SPLITS = ("train", "val")
OUTPUTS = ("train.npy", "val.npy", "report.json", "sample.png", "validation.json")
SUM_SLACK = 0.01  # float16 rounding of a map's patch weights (which sum to at most 1)


def _split_maps(
    source: PriorSource,
    params: PriorParams,
    data: Path,
    split: str,
    meta: dict,
    path: Path,
    bar: Any,
) -> np.ndarray:
    """Every record's map of ``split`` into a new ``.npy`` at ``path``; returns it (mapped)."""
    device = source.device
    count = meta["splits"][split]["count"]
    loader = make_loader(
        data / f"{split}.beton",
        LoaderSpec.from_meta(meta),
        params.batch_size,
        train=split == "train",  # the geometry that split's training or test loader cuts
        num_workers=params.num_workers,
        device=str(device),
    )
    maps = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(count, *source.grid))
    seen = np.zeros(count, dtype=bool)
    task = bar.add_task(f"prior {split}", total=count)
    for images, _, index in loader:
        rows = index.numpy()
        maps[rows] = source(images).cpu().numpy().astype(np.float16)
        seen[rows] = True
        bar.advance(task, len(rows))
    if not seen.all():
        raise RanError(f"{data / f'{split}.beton'} lacks {int((~seen).sum())} records: re-ingest")
    maps.flush()
    return maps


def _frame(maps: np.ndarray) -> Any:
    """One row per record: its index and its map's sum, minimum, maximum, finiteness."""
    import pandas as pd

    flat = maps.reshape(len(maps), -1).astype(np.float32)
    return pd.DataFrame(
        {
            "index": np.arange(len(maps)),
            "map_sum": flat.sum(1),
            "map_min": flat.min(1),
            "map_max": flat.max(1),
            "finite": np.isfinite(flat).all(1),
        }
    )


def validate_prior(maps: dict[str, np.ndarray], counts: dict[str, int]) -> Any:
    """Great Expectations on each split's per-record table: one map per record, every
    weight finite and in [0, 1], a map's weights summing to at most 1 (a softmax row)."""
    import great_expectations.expectations as gxe

    def expectations(count: int) -> list[Any]:
        return [
            gxe.ExpectTableRowCountToEqual(value=count),
            gxe.ExpectColumnValuesToBeUnique(column="index"),
            gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="map_min", min_value=0, max_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="map_max", min_value=0, max_value=1),
            gxe.ExpectColumnValuesToBeBetween(
                column="map_sum", min_value=0, max_value=1 + SUM_SLACK
            ),
        ]

    return check_frames(
        "prior", {split: (_frame(m), expectations(counts[split])) for split, m in maps.items()}
    )


def _sample_figure(data: Path, meta: dict, maps: np.ndarray, count: int, path: Path) -> None:
    """The first ``count`` train images, each beside its map and the map over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(maps))
    loader = make_loader(
        data / "train.beton",
        LoaderSpec.from_meta(meta),
        count,
        train=True,
        indices=np.arange(count),
    )
    images, labels, _ = next(iter(loader))
    fig, axes = plt.subplots(3, count, figsize=(1.6 * count, 5), squeeze=False)
    for n in range(count):
        image = images[n].permute(1, 2, 0).numpy()
        extent = (0, image.shape[1], image.shape[0], 0)
        axes[0, n].imshow(image)
        axes[1, n].imshow(maps[n].astype(np.float32), cmap="inferno")
        axes[2, n].imshow(image)
        axes[2, n].imshow(maps[n].astype(np.float32), cmap="inferno", alpha=0.6, extent=extent)
        axes[0, n].set_title(meta["classes"][int(labels[n])], fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("train images, their [CLS] attention, the two overlaid", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_prior(params: PriorParams, data: Path, out: Path) -> dict[str, Any]:
    """Run the ViT over ``data``'s train and val splits into ``out`` (all or nothing);
    returns ``report.json``. Maps that fail validation are an error, and nothing is kept."""
    meta = read_meta(data)
    source = prior_source(
        params.vit,
        params.vit_weights,
        params.size,
        params.init,
        params.aggregate,
        params.seed,
        pick_device(params.device),
    )
    vit = source.vit
    weights = params.vit_weights if params.init != "constant" else None  # the control's: none
    counts = {split: meta["splits"][split]["count"] for split in SPLITS}
    with staged_output(out) as tmp:
        with progress_bar() as bar:
            maps = {
                split: _split_maps(source, params, data, split, meta, tmp / f"{split}.npy", bar)
                for split in SPLITS
            }
        check = validate_prior(maps, counts)
        (tmp / "validation.json").write_text(json.dumps(check.as_json(), indent=2) + "\n")
        if not check.success:
            raise RanError(f"the prior maps failed validation: {check.summary()}")
        statistics = {split: map_statistics(maps[split]) for split in SPLITS}
        report = {
            "vit": params.vit,
            "init": params.init,
            "weights": str(weights) if weights else None,
            "weights_sha256": sha256_file(weights) if weights else None,
            "size": params.size,
            "patch": vit.patch_embed.patch_size[0],
            "grid": list(vit.patch_embed.grid_size),
            "aggregate": params.aggregate,
            "seed": params.seed,
            "heads": vit.blocks[-1].attn.num_heads,
            "dataset": meta["dataset"],
            "records": counts,
            "data_sha256": {split: meta["splits"][split]["sha256"] for split in SPLITS},
            **{f"{split}_{k}": v for split in SPLITS for k, v in statistics[split].items()},
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if params.samples:
            _sample_figure(data, meta, maps["train"], params.samples, tmp / "sample.png")
    return report


def tracked_prior(
    params: PriorParams,
    data: Path,
    out: Path,
    experiment: str,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`make_prior` inside an MLflow run holding ``out``."""
    logged = {**params.model_dump(mode="json"), "data": str(data), "out": str(out)}
    with tracked_stage("prior", experiment, logged, out, tags=tags):
        report = make_prior(params, data, out)
        log_metrics({k: v for k, v in report.items() if isinstance(v, float)})
        log_outputs(out, OUTPUTS[2:])
        what = (
            f"a constant map (every weight 1/(h·w), the control) on the grid of {params.vit}"
            if params.init == "constant"
            else f"the last block's [CLS] attention of a {params.init} {params.vit}"
        )
        describe(
            f"Computes {what} at {params.size} px for every record of `{data}` into `{out}` "
            f"(mean normalised entropy of the train maps "
            f"{report['train_mean_normalised_entropy']:.4f}; 1 is flat)."
        )
        for split in SPLITS:
            path = out / f"{split}.npy"
            log_file_dataset(path, f"prior-{split}", sha256_file(path), context="prior")
    return report
