"""The one table of backbones: every part that needs to know a backbone reads it here.

The params schema checks `train.arch` against its names, the model builder
re-heads each family where its `head` lives, and Grad-CAM explains each
family's `cam_layer` (the last layer whose output still has a spatial map).
Plain data with no torch import, so validating params stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    head: str  # dotted name of the classification head that build_model replaces
    cam_layer: str  # dotted name of the layer Grad-CAM weighs ("[-1]" indexes a Sequential/ModuleList)
    patch: int = 1  # the image size must be a multiple of this (ViT: its 16 px patches)


FAMILIES = {
    "resnet": Family(head="fc", cam_layer="layer4[-1]"),
    "shufflenet_v2": Family(head="fc", cam_layer="conv5"),
    "densenet": Family(head="classifier", cam_layer="features.norm5"),
    "efficientnet": Family(head="classifier.1", cam_layer="features[-1]"),
    "vit": Family(head="heads.head", cam_layer="encoder.layers[-1].ln_1", patch=16),
}

# torchvision classification backbones the model builder knows how to re-head.
ARCHITECTURES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "densenet121",
    "efficientnet_b0",
    "vit_b_16",
)


def family_name(arch: str) -> str:
    """`resnet50` -> `resnet`, `shufflenet_v2_x1_0` -> `shufflenet_v2`, `vit_b_16` -> `vit`."""
    for name in sorted(FAMILIES, key=len, reverse=True):
        if arch.startswith(name):
            return name
    raise ValueError(f"no known family for architecture {arch!r}")


def family(arch: str) -> Family:
    return FAMILIES[family_name(arch)]
