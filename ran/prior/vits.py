"""The ViTs that ``ran-cli pretrain`` trains here, registered with timm under their own names,
so that every path that takes a timm name (``ran-cli prior --vit``, :func:`.vit.load_vit`,
prediction) builds them and loads their weights file the way it does DINO's published ViTs:
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": ...})``.

Variants are data (:data:`VARIANTS`), as timm's own model files are: a name, then the
VisionTransformer's arguments. Their pretrained config carries ImageNet's mean and std, the
normalisation DINO's ViTs and lightly's DINO views use; the weights come only from a local
file (there is nothing to download). Importing this module registers them.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

# name → VisionTransformer arguments. The CPU ViT is ViT-Tiny's width (192, 3 heads) at half
# its depth with 8 px patches: at CIFAR's 32 px that is 16 tokens, 4×4 attention maps, and
# about a tenth of ViT-S/8's cost per image (docs/vitmask.md: a ViT trained here).
VARIANTS: dict[str, dict[str, Any]] = {
    "ran_vit_tiny6_patch8_32": dict(patch_size=8, embed_dim=192, depth=6, num_heads=3),
    "ran_vit_tiny_patch8_32": dict(patch_size=8, embed_dim=192, depth=12, num_heads=3),
    "ran_vit_small_patch8_224": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "ran_vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
}


def _side(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


default_cfgs = generate_default_cfgs(
    {
        name: {
            "url": "",
            "num_classes": 0,
            "input_size": (3, _side(name), _side(name)),
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "license": "the project's own weights",
        }
        for name in VARIANTS
    }
)


def _entrypoint(name: str) -> Any:
    def build(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        options = {"img_size": _side(name), "dynamic_img_size": True, **VARIANTS[name], **kwargs}
        return _create_vision_transformer(name, pretrained=pretrained, **options)

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    return build


for _name in VARIANTS:
    globals()[_name] = register_model(_entrypoint(_name))
