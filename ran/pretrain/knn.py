"""How good self-supervised features are, measured the standard way (DINO's ``eval_knn``):
a weighted k-NN classifier on the frozen, L2-normalised [CLS] features, train split →
test split. Each test image's k nearest train images (cosine) vote for their labels with
weight exp(similarity / T); top-1 is the share of test images whose heaviest class is
theirs. Labels are read here only, never by the training.

The maps' peakedness is measured on the same pass: the last block's [CLS] attention over
the patches (:func:`ran.prior.vit.cls_attention`, as the prior stage computes it), its
normalised entropy (1: flat) and its peak over its mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ran.data.beton import LoaderSpec, make_loader
from ran.prior.maps import map_statistics
from ran.prior.vit import cls_attention, vit_normalize

MAP_RECORDS = 2000  # the first val records whose maps are measured


def features(
    backbone: Any, data: Path, split: str, meta: dict, size: int, batch_size: int, bar: Any
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``split``'s L2-normalised [CLS] features, its labels and (val) the first
    :data:`MAP_RECORDS` maps, the images cut as the prior stage cuts them."""
    device = next(backbone.parameters()).device
    spec = LoaderSpec.from_meta(meta)
    loader = make_loader(data / f"{split}.beton", spec, batch_size, train=split == "train")
    found, labels, maps = [], [], []
    mapped = 0
    task = bar.add_task(f"k-NN {split}", total=meta["splits"][split]["count"])
    was_training = backbone.training
    backbone.eval()
    with torch.inference_mode():
        for images, label, _ in loader:
            x = vit_normalize(images.to(device), backbone, size)
            found.append(torch.nn.functional.normalize(backbone(x).float(), dim=1).cpu())
            labels.append(label.cpu().clone())  # FFCV reuses its batch buffers
            if split == "val" and mapped < MAP_RECORDS:
                maps.append(cls_attention(backbone, x[: MAP_RECORDS - mapped]).float().cpu())
                mapped += len(maps[-1])
            bar.advance(task, len(images))
    bar.remove_task(task)
    backbone.train(was_training)
    return torch.cat(found), torch.cat(labels), torch.cat(maps).numpy() if maps else np.empty(0)


def knn_top1(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    temperature: float,
    classes: int,
    chunk: int = 1000,
) -> float:
    """Top-1 (%) of the weighted k-NN vote of ``test`` among ``train`` (normalised rows)."""
    correct = 0
    for start in range(0, len(test), chunk):
        similarity = test[start : start + chunk] @ train.T
        weights, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(weights), classes)
        votes.scatter_add_(1, train_labels[index], (weights / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start : start + chunk]).sum())
    return 100.0 * correct / len(test)


def evaluate_backbone(
    backbone: Any, data: Path, meta: dict, size: int, k: int, temperature: float, bar: Any
) -> dict[str, float]:
    """k-NN top-1 train → val and the val maps' peakedness of ``backbone``."""
    batch = 500
    train, train_labels, _ = features(backbone, data, "train", meta, size, batch, bar)
    test, test_labels, maps = features(backbone, data, "val", meta, size, batch, bar)
    top1 = knn_top1(
        train, train_labels, test, test_labels, k, temperature, int(meta["num_classes"])
    )
    return {"knn_top1": top1, **{f"map_{k}": v for k, v in map_statistics(maps).items()}}
