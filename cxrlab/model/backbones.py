"""Models from torchvision by name, re-headed for our classes, and their checkpoints.

Each backbone family keeps its classification head in a known place (`fc`
in ResNet and ShuffleNet V2, `classifier` in DenseNet, `classifier.1` in
EfficientNet, `heads.head` in ViT). `build_model` replaces it by a new head
with an output per class: `Dropout(p)` then `Linear` (the study's dropout
variant when p > 0), or an MLP with `head_hidden` sizes (Linear, ReLU,
Dropout(p) per hidden layer, then Linear). With `keep_imagenet_head` the
pretrained 1000-way ImageNet classifier stays and the new head is stacked on
its outputs (the 4-class ResNet-152 study's "Linear 1000->256, ReLU,
Linear 256->4"). ViT is built for the data's image size; pretrained position
embeddings are interpolated to it.

A checkpoint holds the weights and everything needed to rebuild and feed the
model: architecture, head, class names, image size and normalisation. It
loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

from cxrlab.errors import UserError
from cxrlab.io.fsio import atomic_file
from cxrlab.model.architectures import family, family_name

CHECKPOINT_FORMAT = "tb-cxr-classifier/1"

def head_name(arch: str, keep_imagenet_head: bool = False) -> str:
    """Dotted name of the module that `build_model` puts in (the trainable head)."""
    name = family(arch).head
    return f"{name}.1" if keep_imagenet_head else name


def make_head(in_features: int, num_classes: int, dropout: float = 0.0,
              hidden: Sequence[int] = ()) -> nn.Module:
    """Linear (after Dropout when p > 0), or an MLP: (Linear, ReLU, Dropout) per hidden size, then Linear."""
    if not hidden:
        linear = nn.Linear(in_features, num_classes)
        return nn.Sequential(nn.Dropout(p=dropout), linear) if dropout > 0 else linear
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(in_features, size), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(p=dropout))
        in_features = size
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


def build_model(arch: str, num_classes: int, dropout: float = 0.0, pretrained: bool = False, *,
                head_hidden: Sequence[int] = (), keep_imagenet_head: bool = False,
                image_size: int = 224) -> nn.Module:
    """A torchvision `arch` with a new `num_classes`-way head (ImageNet weights if `pretrained`).

    `keep_imagenet_head` builds the 1000-way classifier (with its ImageNet
    weights when `pretrained`) and stacks the new head on it.
    """
    kwargs = {}
    patch = family(arch).patch
    if patch > 1:
        if image_size % patch:
            raise UserError(f"{arch} needs an image size divisible by {patch}; set data.image_size "
                            f"to e.g. {max(patch, image_size // patch * patch)} (got {image_size})")
        kwargs["image_size"] = image_size
    name = family(arch).head
    if not (pretrained or keep_imagenet_head or head_hidden):
        # from scratch with a plain head: the family's own head (and its initialisation)
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        if dropout > 0:
            set_module(model, name, nn.Sequential(nn.Dropout(p=dropout), model.get_submodule(name)))
        return model
    if pretrained:
        model = _pretrained(arch, image_size)
    else:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    old = model.get_submodule(name)
    if keep_imagenet_head:
        new = nn.Sequential(old, make_head(old.out_features, num_classes, dropout, head_hidden))
    else:
        new = make_head(old.in_features, num_classes, dropout, head_hidden)
    set_module(model, name, new)
    return model


def _pretrained(arch: str, image_size: int) -> nn.Module:
    """The ImageNet model; a ViT's position embeddings interpolated to `image_size`."""
    weights = _imagenet_weights(arch)
    model = torchvision.models.get_model(arch, weights=weights)
    if family_name(arch) == "vit" and image_size != model.image_size:
        state = interpolate_embeddings(image_size, model.patch_size, model.state_dict())
        model = torchvision.models.get_model(arch, weights=None, image_size=image_size)
        model.load_state_dict(state)
    return model


def head(model: nn.Module) -> tuple[str, nn.Linear]:
    """Dotted name and module of the final classification layer (the last `nn.Linear`)."""
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
                    mean, std, head_hidden: Sequence[int] = (), keep_imagenet_head: bool = False,
                    **extra: Any) -> dict[str, Any]:
    """What a checkpoint needs besides weights to rebuild and feed its model."""
    return {"format": CHECKPOINT_FORMAT, "arch": arch, "dropout": float(dropout),
            "head_hidden": [int(h) for h in head_hidden], "keep_imagenet_head": bool(keep_imagenet_head),
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
        # torch's own message advises retrying with weights_only=False, which would run any code the
        # file holds: it is never repeated, only the object it refused or the first line of other errors
        text = str(err)
        culprit = re.search(r"GLOBAL ([\w.]+)", text)
        if isinstance(err, pickle.UnpicklingError) and culprit:
            raise UserError(f"{path} is not a checkpoint written by this pipeline: it holds Python objects "
                            f"({culprit.group(1)}) that a safe load refuses to run, and it was not loaded. Use a "
                            "checkpoint written by the train stage (dvc repro)") from None
        if isinstance(err, pickle.UnpicklingError):
            why = "not a file torch.save wrote"
        else:
            why = next((ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln), "damaged")
        raise UserError(f"{path} is not a loadable checkpoint ({type(err).__name__}: {why}); "
                        "use a checkpoint written by the train stage") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this pipeline "
                        f"(expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the checkpoint's model and load its weights (strictly)."""
    model = build_model(ckpt["arch"], len(ckpt["classes"]), ckpt["dropout"],
                        head_hidden=ckpt.get("head_hidden", ()),
                        keep_imagenet_head=ckpt.get("keep_imagenet_head", False),
                        image_size=ckpt["image_size"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"{path}: the weights do not fit a {ckpt['arch']} with classes "
                        f"{ckpt['classes']}: {str(err).splitlines()[0]}") from None
    return model
