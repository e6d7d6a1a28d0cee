"""Training losses: cross-entropy, plus the study's explicit L2 penalty.

The `regu_penalty` variant adds 0.5 * lambda * sum(theta^2) over every
parameter (biases and BatchNorm included) to the cross-entropy, on top of
the optimiser's weight decay, as the study did.
"""

from __future__ import annotations

import torch
from torch import nn


def l2_penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """0.5 * lam * sum of the squares of all parameters, in float32."""
    total = sum(p.float().pow(2).sum() for p in model.parameters())
    return 0.5 * lam * total


class StudyLoss(nn.Module):
    """Cross-entropy of the logits, plus `l2_penalty(model, lam)` when lam > 0."""

    def __init__(self, model: nn.Module, l2_lambda: float = 0.0):
        super().__init__()
        self.model = [model]  # a list, so the model is not registered as a submodule
        self.l2_lambda = l2_lambda
        self.ce = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits.float(), target)
        if self.l2_lambda > 0:
            loss = loss + l2_penalty(self.model[0], self.l2_lambda)
        return loss
