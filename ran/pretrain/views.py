"""DINO's multi-crop views of a batch, from lightly's ``DINOTransform``: two global views
(the second with solarisation) and ``local_views`` small ones, each with flips, colour
jitter, grey-scale and (``blur``) Gaussian blur, normalised with ImageNet's mean and std as
the ViTs of :mod:`ran.prior.vits` expect.

lightly's transforms draw from torch's and NumPy's global generators. Each batch's views
are drawn under generators seeded by (seed, step) and restored afterwards, so a step's
views are a function of the step, an exact resume needs no generator state, and nothing
else that draws at random is disturbed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ran.config import PretrainParams


class Views:
    """uint8 images (N×3×H×W, as the loader yields them) → the list of view batches."""

    def __init__(self, params: PretrainParams) -> None:
        from lightly.transforms.dino_transform import DINOTransform

        self.seed = params.seed
        blur = (1.0, 0.1, 0.5) if params.blur else (0.0, 0.0, 0.0)
        self.transform: Any = DINOTransform(
            global_crop_size=params.size,
            global_crop_scale=params.global_scale,
            local_crop_size=params.local_size,
            local_crop_scale=params.local_scale,
            n_local_views=params.local_views,
            gaussian_blur=blur,
        )

    def __call__(self, images: torch.Tensor, step: int) -> list[torch.Tensor]:
        from PIL import Image

        pixels = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        numpy_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(self.seed, step, "views"))
            np.random.seed(step_seed(self.seed, step, "views"))
            per_image = [self.transform(Image.fromarray(p)) for p in pixels]
        np.random.set_state(numpy_state)
        return [torch.stack(view) for view in zip(*per_image, strict=True)]


def step_seed(seed: int, step: int, use: str) -> int:
    """A 32-bit seed that is a function of (seed, step, use) only: what draws at random in a
    step (its views, the student's stochastic depth) is seeded by it."""
    return int(np.random.SeedSequence([seed, step, *use.encode()]).generate_state(1)[0])
