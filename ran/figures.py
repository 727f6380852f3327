"""Figures the stages write as PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def matrix_png(
    counts: np.ndarray, classes: list[str], path: Path, title: str, xlabel: str, ylabel: str
) -> None:
    """A class × class count matrix as a heat map of its row-normalised rates (a confusion
    matrix, a label-noise transition matrix); up to 20 classes get names and counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    size = min(4 + k * 0.35, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        ax.set_xticks(range(k), classes, rotation=90)
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
