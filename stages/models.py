"""Models from torchvision by name, re-headed for our classes, and their checkpoints.

The classification head of any supported backbone is its last `nn.Linear`
(`fc` in ResNet and ShuffleNet, `classifier` in DenseNet, `classifier.1` in
EfficientNet, `heads.head` in ViT); it is replaced by one with an output per
class, with `Dropout(p)` in front when `dropout > 0` (the study's dropout
variant). A checkpoint holds the weights and everything needed to rebuild
and feed the model: architecture, head, class names, image size and
normalisation. It loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from stages.errors import UserError
from stages.fsio import atomic_file

CHECKPOINT_FORMAT = "tb-cxr-classifier/1"


def build_model(arch: str, num_classes: int, dropout: float = 0.0, pretrained: bool = False) -> nn.Module:
    """A torchvision `arch` with a `num_classes`-way head (ImageNet weights if `pretrained`)."""
    if pretrained:
        model = torchvision.models.get_model(arch, weights=_imagenet_weights(arch))
        name, old = head(model)
        set_module(model, name, nn.Linear(old.in_features, num_classes))
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if dropout > 0:
        name, linear = head(model)
        set_module(model, name, nn.Sequential(nn.Dropout(p=dropout), linear))
    return model


def head(model: nn.Module) -> tuple[str, nn.Linear]:
    """Dotted name and module of the classification head (the last `nn.Linear`)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return linears[-1]


def set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _imagenet_weights(arch: str):
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not cached.is_file():
        try:
            weights.get_state_dict(progress=True)
        except Exception as err:  # offline, proxy, HTTP error: all mean "not available"
            raise UserError(
                f"ImageNet weights for {arch} are not in the torch hub cache and could not be "
                f"downloaded ({type(err).__name__}: {err}). Download {weights.url} on a machine "
                f"with internet and put it at {cached} (or set TORCH_HOME), or set train.pretrained: false"
            ) from None
    return weights


# ------------------------------------------------------------- checkpoints
def checkpoint_meta(arch: str, dropout: float, classes: list[str], image_size: int,
                    mean, std, **extra: Any) -> dict[str, Any]:
    """What a checkpoint needs besides weights to rebuild and feed its model."""
    return {"format": CHECKPOINT_FORMAT, "arch": arch, "dropout": float(dropout),
            "classes": list(classes), "image_size": int(image_size),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], **extra}


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any], **state: Any) -> None:
    """Write `meta`, the weights and any extra `state` to `path` atomically."""
    payload = {**meta, **state, "model": unwrap(model).state_dict()}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (no pickled code) and check it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train it first (dvc repro)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise UserError(f"{path} is not a loadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this pipeline "
                        f"(expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the checkpoint's model and load its weights (strictly)."""
    model = build_model(ckpt["arch"], len(ckpt["classes"]), ckpt["dropout"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"{path}: the weights do not fit a {ckpt['arch']} with classes "
                        f"{ckpt['classes']}: {str(err).splitlines()[0]}") from None
    return model
