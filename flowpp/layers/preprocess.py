"""Logit preprocessing: dequantized pixels in [0, L) to the real line.

y = logit(0.05 + 0.9 * x / L). Its logdet is counted in full, so that bits/dim
is measured on the L-level scale of the data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sigmoid_logdet(z: torch.Tensor) -> torch.Tensor:
    """log |d sigmoid(z) / dz| = -softplus(z) - softplus(-z), summed per sample."""
    return (-F.softplus(z) - F.softplus(-z)).flatten(1).sum(1)


class LogitPreprocess(nn.Module):
    def __init__(self, num_levels: int = 256, alpha: float = 0.05):
        super().__init__()
        self.num_levels = num_levels
        self.alpha = alpha

    @property
    def _scale(self) -> float:
        return (1.0 - 2.0 * self.alpha) / self.num_levels

    def forward(self, x, cond=None):
        p = x * self._scale + self.alpha  # [0, L) -> [0.05, 0.95)
        y = torch.log(p) - torch.log1p(-p)
        # d logit(p)/dp = 1 / (p (1 - p)) = exp(softplus(y) + softplus(-y))
        logdet = (F.softplus(y) + F.softplus(-y)).flatten(1).sum(1)
        return y, logdet + math.log(self._scale) * x[0].numel()

    def inverse(self, y, cond=None):
        return (torch.sigmoid(y) - self.alpha) / self._scale
