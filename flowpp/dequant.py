"""Dequantization: continuous noise u in [0, 1) added to discrete pixels x.

Variational dequantization (Flow++ section 3.1) learns q(u | x) as a flow from
eps ~ N(0, I) to u, conditioned on x through a context net, ending in a sigmoid:

    log P(x) >= E_q[ log p(x + u) - log q(u | x) ]

Uniform dequantization (u ~ U[0, 1), log q = 0) stays available for ablation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flowpp.layers import InvertibleSequential, sigmoid_logdet, split_halves
from flowpp.nets import ContextNet


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch axis of log N(z; 0, I)."""
    return (-0.5 * (z**2 + math.log(2 * math.pi))).flatten(1).sum(1)


class UniformDequantizer(nn.Module):
    @staticmethod
    def draw(shape, *, device=None, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise ``forward`` takes: u ~ U[0, 1)."""
        return torch.rand(shape, device=device, dtype=dtype, generator=generator)

    def forward(self, x: torch.Tensor, dtype=torch.float32, noise: torch.Tensor | None = None):
        """u ~ U[0, 1) (``noise``, or drawn from torch's generator), log q = 0."""
        u = self.draw(x.shape, device=x.device, dtype=dtype) if noise is None else noise.to(dtype)
        return u, u.new_zeros(x.shape[0])


class VariationalDequantizer(nn.Module):
    """q(u | x): eps -> flow steps (conditioned on context(x)) -> sigmoid -> u."""

    def __init__(self, shape, num_levels: int, context: ContextNet, steps: list[nn.Module]):
        super().__init__()
        self.num_levels = num_levels
        self.context_net = context
        self.flow = InvertibleSequential(steps)

    def context(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """(B, C, H, W) integers -> (B, hidden, H, W/2)."""
        centred = x.to(dtype) / self.num_levels - 0.5
        return self.context_net(torch.cat(split_halves(centred, "stripe"), dim=1))

    def transform(self, eps, context):
        """eps (B, C, H, W) -> u in (0, 1), with log |du / deps| per sample (B,)."""
        h, logdet = self.flow(eps, context)
        return torch.sigmoid(h), logdet + sigmoid_logdet(h)

    def inverse_transform(self, u, context):
        """u in (0, 1) (B, C, H, W) -> eps."""
        return self.flow.inverse(torch.log(u) - torch.log1p(-u), context)

    @staticmethod
    def draw(shape, *, device=None, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise ``forward`` takes: eps ~ N(0, I)."""
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)

    def forward(self, x: torch.Tensor, dtype=torch.float32, noise: torch.Tensor | None = None):
        """Sample u ~ q(u | x) from ``noise`` (eps ~ N(0, I); drawn from torch's generator if
        None); returns (u, log q(u | x))."""
        eps = self.draw(x.shape, device=x.device, dtype=dtype) if noise is None else noise.to(dtype)
        u, logdet = self.transform(eps, self.context(x, dtype))
        return u, standard_normal_log_prob(eps) - logdet


__all__ = ["UniformDequantizer", "VariationalDequantizer", "standard_normal_log_prob"]
