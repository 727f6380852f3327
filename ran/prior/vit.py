"""The frozen ViT and its [CLS] attention: what the prior stage runs over every record.

The ViT comes from timm (DINO ViT-S/8 and ViT-B/8 are ``vit_small_patch8_224.dino`` and
``vit_base_patch8_224.dino``). A local weights file goes through timm's own pretrained
path (``pretrained_cfg_overlay={"file": ...}``), the code a download would run, so its
checkpoint filter interpolates the position embeddings to the chosen input size (bicubic,
as DINO does for other sizes) and a file of another network fails there.

timm's fused attention (``scaled_dot_product_attention``) never materialises the attention
weights, so :func:`cls_attention` computes them itself from the last block's own layers:
its pre-norm, its q/k projection (and q/k norms), its scale, a softmax over all tokens;
then it keeps the [CLS] row over the patch tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ran.errors import RanError

PATCH_MODELS = "vit_small_patch8_224.dino, vit_base_patch8_224.dino"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_vit(
    name: str,
    weights: Path | None,
    size: int,
    random_init: bool = False,
    seed: int = 0,
    **options: Any,
) -> Any:
    """The ViT ``name`` at input side ``size``, in eval mode with gradients off: weights from
    ``weights`` (a local file), else timm's download, else (``random_init``) seeded random."""
    import timm

    import ran.prior.vits  # noqa: F401 - registers the ViTs pretrained here with timm

    if not timm.is_model(name):
        raise RanError(f"unknown ViT {name!r}; timm names it, e.g. {PATCH_MODELS}")
    options |= {"img_size": size, "num_classes": 0}
    if random_init:
        torch.manual_seed(seed)
        options["pretrained"] = False
    else:
        options["pretrained"] = True
        if weights is not None:
            if not weights.is_file():
                raise RanError(f"ViT weights file {weights} does not exist; pass the file's path")
            options["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        vit = timm.create_model(name, **options)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        if weights is not None:
            raise RanError(
                f"ViT weights {weights} do not fit {name} ({_first_line(exc)}); pass the weights "
                "of that ViT, or name the ViT they belong to with --vit"
            ) from None
        if "size" in str(exc) and "patch" in str(exc).lower():
            raise RanError(f"--size {size} does not suit {name}: {_first_line(exc)}") from None
        raise RanError(
            f"cannot get the weights of {name} ({_first_line(exc)}); without network pass a "
            "local file with --vit-weights (docs/vitmask.md: ViT weights)"
        ) from None
    patch = vit.patch_embed.patch_size[0]
    if size % patch:
        raise RanError(f"--size {size} is not a multiple of {name}'s patch ({patch} px)")
    return vit.eval().requires_grad_(False)


def vit_normalize(images: torch.Tensor, vit: Any, size: int) -> torch.Tensor:
    """uint8 images (N×3×H×W) → the ViT's input: bicubic to ``size`` (the report upsamples
    CIFAR's 32 px to 224), scaled by the ViT's own mean and std (ImageNet's for DINO)."""
    import torch.nn.functional as F

    cfg = vit.pretrained_cfg
    x = images.float() / 255
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(cfg["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class PriorSource:
    """The prior map of a batch of images, as the ``prior`` stage computes it for a record and
    prediction computes it for an image file: the loaders' uint8 images (N×3×H×W) → the ViT's
    [CLS] attention (N×h×w float32). One object per ViT, built by :func:`prior_source`."""

    def __init__(self, vit: Any, size: int, aggregate: str) -> None:
        self.vit, self.size, self.aggregate = vit, size, aggregate
        self.device = next(vit.parameters()).device
        self.grid = tuple(vit.patch_embed.grid_size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        autocast = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=autocast):
            x = vit_normalize(images.to(self.device), self.vit, self.size)
            return cls_attention(self.vit, x, self.aggregate).float()


class ConstantPriorSource(PriorSource):
    """The control prior (``init: constant``): every map the uniform distribution over the
    patches, each weight 1/(h·w), on the grid the ViT gives at ``size``; the ViT (seeded
    random, never run) is only asked its grid, patch and heads.

    Why this is the fair "no information" control: the vitmask network scales every map to
    mean 1 before its attention branch (:class:`ran.models.vitmask.PriorMasks`), so a constant
    map reaches the branch as all ones, at the real maps' mean, and the value chosen changes
    nothing there; 1/(h·w) makes it the attention of a [CLS] query that prefers no patch (the
    real maps are softmax rows too), so it passes the prior stage's checks (weights in
    [0, 1], summing to at most 1) and reads as flat in its statistics (normalised entropy 1,
    peak over mean 1). Trained beside the real prior at the same strength, the network then
    differs only in what the maps say about the image: the extra branch, its gates and the
    augmentation's padding and erasing of the map are the same in both.
    """

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        return torch.full((len(images), h, w), 1 / (h * w), device=self.device)


def prior_source(
    name: str,
    weights: Path | None,
    size: int,
    init: str,
    aggregate: str,
    seed: int = 0,
    device: Any = "cpu",
) -> PriorSource:
    """The :class:`PriorSource` of ViT ``name`` (``init``: pretrained from ``weights`` or
    timm's download, or seeded random) at input side ``size`` on ``device``; ``init``
    ``constant``: the :class:`ConstantPriorSource` on that ViT's grid (``weights`` unused)."""
    if init == "constant":
        vit = load_vit(name, None, size, random_init=True, seed=seed).to(device)
        return ConstantPriorSource(vit, size, aggregate)
    vit = load_vit(name, weights, size, init == "random", seed).to(device)
    return PriorSource(vit, size, aggregate)


def cls_attention(vit: Any, x: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """The last block's softmax attention of the [CLS] query over the patch tokens, the
    heads aggregated (``mean`` or ``max``): N×h×w for normalised images ``x``.

    The weights sum to 1 over all tokens, [CLS] and any register tokens included, so over the
    patches they sum to a little less; they are stored as they are.
    """
    tokens = vit.patch_embed(x)
    tokens = vit._pos_embed(tokens)
    tokens = vit.norm_pre(vit.patch_drop(tokens))
    for block in vit.blocks[:-1]:
        tokens = block(tokens)
    last = vit.blocks[-1]
    attn = last.attn
    n, count, _ = tokens.shape
    qkv = attn.qkv(last.norm1(tokens))
    qkv = qkv.reshape(n, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    patches = weights[:, :, 0, vit.num_prefix_tokens :]
    maps = patches.mean(1) if aggregate == "mean" else patches.amax(1)
    grid = vit.patch_embed.grid_size
    return maps.reshape(n, *grid)
