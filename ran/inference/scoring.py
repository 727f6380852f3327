"""A trained network's forward pass as evaluation, training's hold-out, prediction and
serving run it: logits (optionally flip-averaged), batches of a loader scored, and the
attention masks of a batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ran.data.beton import LoaderSpec
from ran.data.transforms import network_view
from ran.prior.maps import prior_batch


def translated_views(x: torch.Tensor, translate: bool) -> list[tuple[float, torch.Tensor]]:
    """airbench94's test-time translation: the image (weight 1/2) and the image shifted one
    pixel up-left and one down-right, reflect-padded (1/4 each); just the image without."""
    if not translate:
        return [(1.0, x)]
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return [(0.5, x), (0.25, padded[..., :h, :w]), (0.25, padded[..., 2:, 2:])]


def class_scores(
    model: torch.nn.Module,
    x: torch.Tensor,
    flip: bool,
    prior: torch.Tensor | None = None,
    translate: bool = False,
) -> torch.Tensor:
    """Logits of normalised images (and their prior maps, for a network that takes them).
    ``flip`` averages the softmax of each image and its mirror, ``translate`` that of
    :func:`translated_views` (both: of every view and its mirror); averaged scores are
    returned as log-probabilities, so softmax, argmax and top-k stay meaningful. A prior map
    is mirrored with its image but not shifted (one pixel of the image is a fraction of one
    of the map's)."""
    extra = [] if prior is None else [prior]
    if not (flip or translate):
        return model(x.contiguous(memory_format=torch.channels_last), *extra).float()
    mirrors = [False, True] if flip else [False]
    total = None
    for weight, view in translated_views(x, translate):
        for mirror in mirrors:
            inputs = [view, *extra]
            if mirror:
                inputs = [t.flip(3) for t in inputs]
            inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
            share = weight / len(mirrors) * model(*inputs).float().softmax(1)
            total = share if total is None else total + share
    return total.log()


def scored_batches(
    model: torch.nn.Module,
    loader: Any,
    spec: LoaderSpec,
    dtype: torch.dtype | None = None,
    flip: bool = False,
    prior: Any = None,
    translate: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(scores, labels, indices)`` per batch of ``loader`` (scores: :func:`class_scores`).
    ``prior``: the split's maps, indexed by record, for a network that takes them."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    with torch.inference_mode(), autocast:
        for images, labels, index in loader:
            x = network_view(images.to(device, non_blocking=True), spec)
            maps = prior_batch(prior, index.numpy(), device)
            yield class_scores(model, x, flip, maps, translate), labels, index


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
