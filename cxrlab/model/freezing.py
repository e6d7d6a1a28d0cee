"""Which parameters train: freezing and progressive unfreezing (`train.freeze`, `train.progressive`).

A freeze setting is one of
- `none`: every parameter trains;
- `head_only`: only the new head (`models.head_name`) trains;
- `up_to:<module>`: every parameter registered up to and including the
  module's (e.g. `up_to:layer3` in a ResNet: the stem and layer1-3) is
  frozen; the rest trains.

`train.progressive` is a list of phases `{epoch, freeze, lr_factor}`: from
`epoch` on, `freeze` applies and the learning rate is multiplied by
`lr_factor` (relative to the schedule's), e.g. head, then layer3-4, then all,
with falling learning rates. Frozen batch-norm layers stay in eval mode, so
their running statistics stay those of the pretrained backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cxrlab.errors import UserError
from cxrlab.model.backbones import head_name


@dataclass(frozen=True)
class Phase:
    epoch: int
    freeze: str
    lr_factor: float


def phases(freeze: str, progressive: list) -> list[Phase]:
    """The training phases: `progressive` if given, else one phase of `freeze` from epoch 1."""
    if not progressive:
        return [Phase(1, freeze, 1.0)]
    return [Phase(int(p["epoch"]), str(p["freeze"]), float(p["lr_factor"])) for p in progressive]


def phase_at(plan: list[Phase], epoch: int) -> Phase:
    """The phase in force at `epoch` (the last one starting at or before it)."""
    return [p for p in plan if p.epoch <= epoch][-1]


def stage_names(model: nn.Module, head: str) -> list[str]:
    """Module names `up_to:` accepts: those with parameters, up to two levels deep, head excluded."""
    names = []
    for name, module in model.named_modules():
        if name and name.count(".") <= 2 and not (name == head or name.startswith(head + ".")) \
                and next(module.parameters(), None) is not None:
            names.append(name)
    return names


def apply_freeze(model: nn.Module, spec: str, arch: str, keep_imagenet_head: bool = False) -> int:
    """Set `requires_grad` of every parameter for `spec`; returns the number that train."""
    head = head_name(arch, keep_imagenet_head)
    params = list(model.named_parameters())
    if spec == "none":
        trainable = {n for n, _ in params}
    elif spec == "head_only":
        trainable = {n for n, _ in params if n.startswith(head + ".")}
    elif spec.startswith("up_to:"):
        stage = spec.removeprefix("up_to:")
        inside = [i for i, (n, _) in enumerate(params) if n.startswith(stage + ".")]
        if not inside or stage == head or stage.startswith(head + "."):
            known = stage_names(model, head)
            raise UserError(f"train.freeze / train.progressive: {arch} has no module {stage!r} to freeze up to; "
                            f"use one of {', '.join(known[:40])}{' ...' if len(known) > 40 else ''}")
        trainable = {n for n, _ in params[inside[-1] + 1:]}
    else:
        raise UserError(f"train.freeze: unknown setting {spec!r}; use none, head_only or up_to:<module>")
    for name, p in params:
        p.requires_grad_(name in trainable)
    return sum(p.numel() for n, p in params if n in trainable)


def train_mode(model: nn.Module) -> None:
    """`model.train()`, except batch-norm layers whose parameters are all frozen stay in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                module.eval()
