"""A trained network's forward pass as evaluation, training's hold-out, prediction and
serving run it: logits (optionally flip-averaged), batches of a loader scored, and the
attention masks of a batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from ran.data.beton import LoaderSpec
from ran.data.transforms import network_view
from ran.prior.maps import prior_batch


def class_scores(
    model: torch.nn.Module, x: torch.Tensor, flip: bool, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of normalised images (and their prior maps, for a network that takes them);
    ``flip`` averages the softmax of each image and its mirror (returned as
    log-probabilities, so softmax, argmax and top-k stay meaningful)."""
    inputs = [x.contiguous(memory_format=torch.channels_last)]
    if prior is not None:
        inputs.append(prior)
    logits = model(*inputs).float()
    if not flip:
        return logits
    mirrored = model(*(t.flip(3) for t in inputs)).float()
    return ((logits.softmax(1) + mirrored.softmax(1)) / 2).log()


def scored_batches(
    model: torch.nn.Module,
    loader: Any,
    spec: LoaderSpec,
    dtype: torch.dtype | None = None,
    flip: bool = False,
    prior: Any = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(scores, labels, indices)`` per batch of ``loader`` (scores: :func:`class_scores`).
    ``prior``: the split's maps, indexed by record, for a network that takes them."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    with torch.inference_mode(), autocast:
        for images, labels, index in loader:
            x = network_view(images.to(device, non_blocking=True), spec)
            maps = prior_batch(prior, index.numpy(), device)
            yield class_scores(model, x, flip, maps), labels, index


def channel_mean_masks(
    model: torch.nn.Module,
    batch: torch.Tensor,
    spec: LoaderSpec,
    prior: torch.Tensor | None = None,
) -> list[np.ndarray]:
    """Each attention module's mask of a ``uint8`` batch, mean over channels: one N×h×w
    array per module (none for a network without attention)."""
    device = next(model.parameters()).device
    inputs = [network_view(batch.to(device), spec)]
    if prior is not None:
        inputs.append(prior.to(device))
    with torch.inference_mode():
        _, masks = model(*inputs, return_masks=True)
    return [mask.float().mean(1).cpu().numpy() for mask in masks]
