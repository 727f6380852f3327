"""Evaluation: a trained ``model.pt`` on the test split (``val.beton``), every record.

Writes, all or nothing (a temporary sibling folder renamed at the end):

- ``metrics.json``: top-1/top-5 accuracy (fractions) and error (%, as the paper states it);
- ``per_class.json``: accuracy of every class;
- ``confusion.json`` + ``confusion.png``: the confusion matrix, and ``predictions.csv`` (one
  row per test record: actual and predicted class) for DVC's confusion-matrix plot;
- ``masks/``: for a fixed handful of test images, the input beside each attention module's
  mask (``forward(x, return_masks=True)``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ran.config import EvaluateParams
from ran.data.beton import LoaderSpec, make_loader
from ran.data.meta import read_meta
from ran.devices import pick_device
from ran.errors import RanError
from ran.figures import matrix_png
from ran.inference.scoring import channel_mean_masks, scored_batches
from ran.modelfile import load_model, loader_spec
from ran.outputs import staged_output
from ran.prior.maps import prior_batch, prior_for
from ran.tracking import describe, log_metrics, log_outputs, tracked_stage, tracking_uri

OUTPUTS = ("metrics.json", "per_class.json", "confusion.json", "confusion.png", "predictions.csv")


def _mask_figures(
    model: torch.nn.Module,
    images: torch.Tensor,
    spec: LoaderSpec,
    folder: Path,
    prior: torch.Tensor | None = None,
) -> list[Path]:
    """One PNG per image: the input, then each module's mask (mean over channels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = channel_mean_masks(model, images, spec, prior)
    if not masks:
        return []
    folder.mkdir()
    paths = []
    for n in range(len(images)):
        fig, axes = plt.subplots(1, len(masks) + 1, figsize=(2 * (len(masks) + 1), 2.2))
        axes[0].imshow(images[n].permute(1, 2, 0).cpu().numpy())
        axes[0].set_title("input", fontsize=8)
        for m, (ax, mask) in enumerate(zip(axes[1:], masks, strict=True), start=1):
            ax.imshow(mask[n], cmap="viridis")
            ax.set_title(f"module {m}", fontsize=8)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        path = folder / f"test-{n:02d}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def _first_images(data: Path, spec: LoaderSpec, count: int) -> torch.Tensor:
    """The first ``count`` test images (uint8), the fixed handful whose masks are drawn."""
    loader = make_loader(data / "val.beton", spec, count, train=False, indices=np.arange(count))
    images, _, _ = next(iter(loader))
    return images


def evaluate(
    model: torch.nn.Module,
    record: dict[str, Any],
    model_path: Path,
    data: Path,
    out: Path,
    params: EvaluateParams,
    prior: Path | None = None,
) -> dict[str, Any]:
    """Score the network of ``model_path`` (``model`` and ``record``, as
    :func:`ran.modelfile.load_model` read them) on ``data/val.beton`` into ``out``; returns
    ``metrics.json``. A network trained with a ViT prior needs ``prior`` (the prior stage's
    folder)."""
    meta = read_meta(data)
    if meta["num_classes"] != record["arch"]["num_classes"] or meta["classes"] != record["classes"]:
        raise RanError(
            f"{model_path} was trained on {record['dataset']} ({record['arch']['num_classes']} "
            f"classes), but {data} holds {meta['dataset']} ({meta['num_classes']}); evaluate it "
            "on the data it was trained on"
        )
    maps = prior_for(str(model_path), getattr(model, "takes_prior", False), prior, "val", meta)
    device = pick_device(params.device)
    model = model.to(device, memory_format=torch.channels_last)
    spec = loader_spec(record, params.image_size)
    if spec.small_images and params.image_size not in (None, record["input_size"]):
        raise RanError(
            f"--image-size {params.image_size}: CIFAR-size data is evaluated at its stored "
            f"side ({record['input_size']} px); the test size applies to ImageNet-size data"
        )
    loader = make_loader(
        data / "val.beton",
        spec,
        params.batch_size,
        train=False,
        num_workers=params.num_workers,
        device=str(device),
    )
    k = meta["num_classes"]
    top1 = top5 = total = 0
    matrix = np.zeros((k, k), dtype=np.int64)
    predictions = []
    for logits, labels, index in scored_batches(
        model, loader, spec, flip=params.flip, prior=maps, translate=params.translate
    ):
        labels = labels.to(logits.device)
        best = logits.topk(min(5, k), dim=1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(1).sum())
        total += len(labels)
        actual, predicted = labels.cpu().numpy(), best[:, 0].cpu().numpy()
        np.add.at(matrix, (actual, predicted), 1)
        predictions += zip(index.numpy().tolist(), actual.tolist(), predicted.tolist(), strict=True)
    expected = meta["splits"]["val"]["count"]
    if total != expected:
        raise RanError(f"evaluated {total} test records, expected {expected}: {data} is damaged")
    classes = meta["classes"]
    per_class = {
        name: float(matrix[i, i] / max(matrix[i].sum(), 1)) for i, name in enumerate(classes)
    }
    metrics = {
        "top1_accuracy": top1 / total,
        "top5_accuracy": top5 / total,
        "top1_error_pct": 100 * (1 - top1 / total),
        "top5_error_pct": 100 * (1 - top5 / total),
        "test_records": total,
        "image_size": spec.side,
        "flip": params.flip,
        "translate": params.translate,
    }
    with staged_output(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "per_class.json").write_text(json.dumps(per_class, indent=2) + "\n")
        confusion = {"classes": classes, "matrix": matrix.tolist()}
        (tmp / "confusion.json").write_text(json.dumps(confusion) + "\n")
        title = "confusion matrix (test split)"
        matrix_png(matrix, classes, tmp / "confusion.png", title, "predicted", "actual")
        with open(tmp / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "actual", "predicted"])
            for index, actual, predicted in predictions:
                writer.writerow([index, classes[actual], classes[predicted]])
        if params.masks:
            first = _first_images(data, spec, params.masks)
            first_maps = prior_batch(maps, np.arange(len(first)), first.device)
            _mask_figures(model, first, spec, tmp / "masks", first_maps)
    return metrics


def tracked_evaluate(
    model_path: Path,
    data: Path,
    out: Path,
    params: EvaluateParams,
    experiment: str,
    tags: dict[str, str] | None = None,
    prior: Path | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` inside an MLflow run linked to the run that trained the model."""
    model, record = load_model(model_path)  # read once: its run id tags the run
    train_run = record.get("run_id")
    link = {"train_run_id": train_run} if train_run else {}
    logged = {**params.model_dump(mode="json"), "model": str(model_path), "data": str(data)}
    logged["prior"] = str(prior) if prior else None
    with tracked_stage("evaluate", experiment, logged, out, tags={**(tags or {}), **link}) as run:
        metrics = evaluate(model, record, model_path, data, out, params, prior)
        log_metrics({k: float(v) for k, v in metrics.items() if k not in ("flip", "translate")})
        log_outputs(out, (*OUTPUTS, "masks"))
        trained = ""
        if train_run:
            page = f"#/experiments/{run.info.experiment_id}/runs/{train_run}"
            trained = f" (the model of training run [`{train_run}`]({page}))"
        views = {"flip": params.flip, "translate": params.translate}
        averaged = " and ".join(name for name, on in views.items() if on)
        flip = f" with {averaged} averaging" if averaged else ""
        describe(
            f"Scores `{model_path}`{trained} on the {metrics['test_records']} test images of "
            f"`{data}`{flip}: top-1 {metrics['top1_accuracy']:.2%}, top-5 "
            f"{metrics['top5_accuracy']:.2%}. Store {tracking_uri()}."
        )
    return metrics
