"""Per-element ActNorm with data-dependent initialisation.

Every element of a (C, H, W) activation has its own gain and bias. On the first
forward pass, when ``initialized`` is False, they are set so that the batch comes
out with zero mean and unit variance per element.
"""

from __future__ import annotations

import torch
from torch import nn

from flowpp.datainit import DataInit


class ActNorm(DataInit):
    def __init__(self, shape: tuple[int, int, int], init_scale: float = 1.0):
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.init_scale = init_scale

    @torch.no_grad()
    def _data_init(self, x: torch.Tensor) -> None:
        if x.shape[0] > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)
        else:  # one image has no per-element spread: fall back to per-channel stats
            mean = x.mean((0, 2, 3), keepdim=True)[0].expand_as(self.bias)
            var = x.var((0, 2, 3), unbiased=False, keepdim=True)[0].expand_as(self.bias)
        scale = self.init_scale * torch.rsqrt(var + 1e-8)
        self.log_gain.copy_(torch.log(scale))
        self.bias.copy_(-mean * scale)
        self.mark_initialized()

    def forward(self, x, cond=None):
        if self.needs_init():
            self._data_init(x)
        y = x * torch.exp(self.log_gain) + self.bias
        return y, x.new_zeros(x.shape[0]) + self.log_gain.sum()

    def inverse(self, y, cond=None):
        return (y - self.bias) * torch.exp(-self.log_gain)
