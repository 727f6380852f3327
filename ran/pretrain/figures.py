"""The pretrain stage's two figures: what more minutes of DINO buy (``knn.png``: the k-NN
top-1 against minutes of training, beside the random ViT's), and what the maps look like
(``maps.png``: val images with the [CLS] attention of the random and of the trained ViT over
them, the maps the prior stage would store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ran.data.beton import LoaderSpec, make_loader
from ran.outputs import atomic_write
from ran.prior.vit import PriorSource

TARGET_GAIN = 10.0  # the points over the random ViT the CPU recipe is meant to reach


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def knn_curve(rows: list[dict[str, float]], title: str, path: Path) -> None:
    """k-NN top-1 (%) against minutes of training; the first row is the random ViT's."""
    plt = _pyplot()
    minutes = [r["minutes"] for r in rows]
    top1 = [r["knn_top1"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(minutes, top1, marker="o", label="DINO-trained ViT (teacher)")
    ax.axhline(top1[0], color="grey", linestyle="--", label=f"random ViT ({top1[0]:.1f} %)")
    ax.axhline(top1[0] + TARGET_GAIN, color="grey", linestyle=":", label="random + 10 points")
    ax.set_xlabel("minutes of pretraining (k-NN evaluations not counted)")
    ax.set_ylabel("k-NN top-1 (%), k=20, T=0.07")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def maps_figure(
    sources: dict[str, PriorSource], data: Path, meta: dict, path: Path, count: int = 8
) -> None:
    """``count`` val images spread over the split (the classes, in a split stored class by
    class), then each source's maps over them, one row each, on one colour scale (0 to the
    largest weight shown), so a flat map looks flat."""
    plt = _pyplot()
    loader = make_loader(
        data / "val.beton",
        LoaderSpec.from_meta(meta),
        count,
        train=False,
        indices=np.linspace(0, meta["splits"]["val"]["count"] - 1, count).astype(np.int64),
    )
    images, labels, _ = next(iter(loader))
    images, labels = images.clone(), labels.clone()
    with torch.inference_mode():
        maps = {name: source(images).cpu().numpy() for name, source in sources.items()}
    top = max(float(m.max()) for m in maps.values())
    fig, axes = plt.subplots(
        1 + len(sources), len(images), figsize=(1.5 * len(images), 1.6 * (1 + len(sources)))
    )
    for n, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        axes[0, n].imshow(image)
        axes[0, n].set_title(meta["classes"][int(labels[n])], fontsize=7)
    for row, (name, found) in enumerate(maps.items(), start=1):
        for n, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
            extent = (0, image.shape[1], image.shape[0], 0)
            axes[row, n].imshow(image)
            axes[row, n].imshow(
                found[n], cmap="inferno", alpha=0.65, extent=extent, vmin=0.0, vmax=top
            )
        axes[row, 0].text(
            -4, image.shape[0] / 2, name, rotation=90, va="center", ha="right", fontsize=7
        )
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("val images and the last block's [CLS] attention over them", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
