"""Training losses: cross-entropy (optionally class-weighted), plus the study's explicit L2 penalty.

The `regu_penalty` variant adds 0.5 * lambda * sum(theta^2) over every
parameter (biases and BatchNorm included) to the cross-entropy, on top of
the optimiser's weight decay, as the study did.

`train.class_weights: inverse_frequency` weights class c by n / (k * n_c)
(scikit-learn's "balanced"), so every class carries the same total weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from cxrlab.errors import UserError


def class_weights(spec: None | str | Mapping[str, float], labels: np.ndarray,
                  classes: list[str]) -> torch.Tensor | None:
    """The cross-entropy's per-class weights for `train.class_weights`, in label order (None: unweighted)."""
    if spec is None:
        return None
    if spec == "inverse_frequency":
        missing = [c for i, c in enumerate(classes) if not np.any(labels == i)]
        if missing:
            raise UserError(f"train.class_weights: inverse_frequency needs training images of every class; "
                            f"there are none of {missing}")
        weights = compute_class_weight("balanced", classes=np.arange(len(classes)), y=labels)
    else:
        if set(spec) != set(classes):  # params.yaml names the classes only without classes: auto
            raise UserError(f"train.class_weights must give a weight to each of the classes {classes} "
                            f"(got {list(spec)})")
        weights = [spec[c] for c in classes]
    return torch.tensor(weights, dtype=torch.float32)


def l2_penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """0.5 * lam * sum of the squares of all parameters, in float32."""
    total = sum(p.float().pow(2).sum() for p in model.parameters())
    return 0.5 * lam * total


class StudyLoss(nn.Module):
    """Cross-entropy of the logits (class-`weight`ed if given), plus `l2_penalty(model, lam)` when lam > 0.

    `terms` gives the two apart, so training can log the cross-entropy (comparable
    across variants) and the penalty (about 36 at initialisation for ResNet-50 with
    lambda 0.001, dwarfing a cross-entropy near 0.69) as separate curves.
    """

    def __init__(self, model: nn.Module, l2_lambda: float = 0.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.model = [model]  # a list, so the model is not registered as a submodule
        self.l2_lambda = l2_lambda
        self.ce = nn.CrossEntropyLoss(weight=weight)

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The objective's parts: `cross_entropy`, and `l2_penalty` when lam > 0; the loss is their sum."""
        parts = {"cross_entropy": self.ce(logits.float(), target)}
        if self.l2_lambda > 0:
            parts["l2_penalty"] = l2_penalty(self.model[0], self.l2_lambda)
        return parts

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return total(self.terms(logits, target))


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of a loss's terms, in their order (cross-entropy first, as the study added them)."""
    values = list(terms.values())
    loss = values[0]
    for value in values[1:]:
        loss = loss + value
    return loss
