"""The per-half 1x1 "pointwise" convolution of the CIFAR-10 model.

Each half of a split gets its own C x C matrix, initialised to the identity plus
0.001 N(0, 1) noise. The log-determinant is taken in float64: the matrices stay
near-identity, where float32 slogdet loses the small terms that matter.
"""

from __future__ import annotations

import torch
from torch import nn

from flowpp.layers.reshape import merge_halves, split_halves


class Pointwise(nn.Module):
    def __init__(self, half_channels: int, split: str, noise: float = 1e-3):
        super().__init__()
        self.split = split
        eye = torch.eye(half_channels).expand(2, -1, -1)
        self.weight = nn.Parameter(eye + noise * torch.randn(2, half_channels, half_channels))

    def _logdet(self, half: torch.Tensor) -> torch.Tensor:
        logabsdet = torch.linalg.slogdet(self.weight.double())[1].sum()
        return (logabsdet * half.shape[2] * half.shape[3]).to(half.dtype)

    def forward(self, x, cond=None):
        halves = split_halves(x, self.split)
        out = [torch.einsum("oc,bchw->bohw", w, h) for w, h in zip(self.weight, halves, strict=True)]
        return merge_halves(*out, self.split), x.new_zeros(x.shape[0]) + self._logdet(halves[0])

    def inverse(self, y, cond=None):
        halves = split_halves(y, self.split)
        inv = torch.linalg.inv(self.weight.double()).to(y.dtype)
        out = [torch.einsum("oc,bchw->bohw", w, h) for w, h in zip(inv, halves, strict=True)]
        return merge_halves(*out, self.split)
