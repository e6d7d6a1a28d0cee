"""Grad-CAM heatmaps for every supported backbone, and their overlay on the X-ray.

The maps come from the `grad-cam` library (pytorch-grad-cam); this module
only knows, per backbone family, which layer to explain: the last block
before global pooling, whose feature map still has a spatial layout. ViT has
no feature map: its last encoder block outputs one token per 16 x 16 patch
(plus the class token), so the patch tokens are reshaped into a grid first.

The heatmap says which regions raised the score of one class; the prediction
command, the explain stage and the web page all explain the positive class
(`data.positive_class`) of a binary task, so a heatmap means the same in each.
"""

from __future__ import annotations

import math
import re

import matplotlib
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cxrlab.data.datasets import to_model_input
from cxrlab.model.architectures import family


def target_layer(model: nn.Module, arch: str) -> nn.Module:
    """The layer whose activations and gradients Grad-CAM weighs, for `arch` (the backbone table's `cam_layer`)."""
    layer = model
    for part in re.findall(r"\w+|\[-?\d+\]", family(arch).cam_layer):
        layer = layer[int(part[1:-1])] if part.startswith("[") else getattr(layer, part)
    return layer


def vit_tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens (N, 1 + h*w, C) -> a feature map (N, C, h, w), class token dropped."""
    patches = tokens[:, 1:, :]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def heatmaps(model: nn.Module, arch: str, images: np.ndarray, mean, std, target_class: int,
             batch_size: int = 16) -> np.ndarray:
    """Grad-CAM of `target_class` for uint8 images (N, 3, H, W): float32 (N, H, W) in [0, 1].

    The model runs on the CPU in fp32 with the same normalisation as
    prediction (`to_model_input`); each map is scaled to its own maximum.
    """
    reshape = vit_tokens_to_grid if arch.startswith("vit") else None
    model = model.eval()
    device = next(model.parameters()).device
    maps = []
    with GradCAM(model=model, target_layers=[target_layer(model, arch)], reshape_transform=reshape) as cam:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            x = to_model_input(batch, device, mean, std, channels_last=False)
            maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)] * len(x)))
    if not maps:
        return np.zeros((0,) + tuple(images.shape[2:]), dtype=np.float32)
    return np.nan_to_num(np.concatenate(maps)).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """A uint8 (H, W, 3) picture: the (3, H, W) uint8 image with `heatmap` in jet colours over it."""
    rgb = image.transpose(1, 2, 0).astype(np.float32) / 255
    colours = matplotlib.colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    return np.clip(255 * ((1 - alpha) * rgb + alpha * colours), 0, 255).round().astype(np.uint8)
