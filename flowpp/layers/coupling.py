"""Mixture-of-logistics coupling: the transform at the heart of Flow++.

The conditioning half x1 drives a coupling net whose output gives, per element
of the other half x2, an affine (a, b) and K mixture components (pi, mu, s):

    y2 = logit(MixLogCDF(x2; pi, mu, s)) * exp(a) + b,      a = tanh(raw)

    logdet = sum[ MixLogPDF(x2) - log y - log(1 - y) + a ],  y = MixLogCDF(x2)

The net may run under bf16 autocast; its output is cast up before any of the
mixture maths, which stays in float32 (or float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flowpp.layers.reshape import half_shape, merge_halves, split_halves
from flowpp.logistic import (
    MIN_LOG_SCALE,
    mixlogistic_inv_cdf,
    mixlogistic_log_cdf,
    mixlogistic_log_pdf,
    mixlogistic_log_sf,
)
from flowpp.nets import CouplingNet
from flowpp.presets import NetConfig


class MixLogisticCoupling(nn.Module):
    def __init__(
        self,
        shape: tuple[int, int, int],
        split: str,
        *,
        num_components: int,
        net: NetConfig,
        bf16: bool = False,
        dropout: float = 0.0,
        context_channels: int = 0,
    ):
        """``shape`` (C, H, W) of the whole input; the net maps one half to the other's
        C * (2 + 3K) parameters, with ``context_channels`` of conditioning (0: none)."""
        super().__init__()
        c, h, w = half_shape(shape, split)
        self.split = split
        self.num_components = num_components
        self.bf16 = bf16
        self.net = CouplingNet(
            c, c * (2 + 3 * num_components), (h, w), net=net, dropout=dropout, context_channels=context_channels
        )

    def _raw(self, x1: torch.Tensor, cond) -> torch.Tensor:
        """The coupling net's output for x1, (B, C * (2 + 3K), H, W), in at least float32."""
        with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            raw = self.net(x1, cond)
        return raw.to(torch.promote_types(x1.dtype, torch.float32))

    def _split_params(self, raw: torch.Tensor):
        """(a, shift, (logits, means, log_scales)), each (B, C, H, W[, K])."""
        b, _, h, w = raw.shape
        raw = raw.reshape(b, -1, 2 + 3 * self.num_components, h, w).movedim(2, -1)
        a, shift = torch.tanh(raw[..., 0]), raw[..., 1]
        logits, means, log_scales = raw[..., 2:].chunk(3, dim=-1)
        return a, shift, (logits, means, log_scales.clamp_min(MIN_LOG_SCALE))

    def _params(self, x1: torch.Tensor, cond):
        return self._split_params(self._raw(x1, cond))

    def _transform(self, x2: torch.Tensor, raw: torch.Tensor):
        """y2 and the per-sample logdet from x2 and the net's raw output."""
        a, shift, mix = self._split_params(raw)
        x2f = x2.to(a.dtype)
        log_y, log_1my = mixlogistic_log_cdf(x2f, *mix), mixlogistic_log_sf(x2f, *mix)
        y2 = (log_y - log_1my) * torch.exp(a) + shift  # logit(y) = log y - log(1 - y)
        logdet = mixlogistic_log_pdf(x2f, *mix) - log_y - log_1my + a
        return y2, logdet.flatten(1).sum(1)

    def forward(self, x, cond=None):
        x1, x2 = split_halves(x, self.split)
        raw = self._raw(x1, cond)
        if torch.is_grad_enabled() and raw.requires_grad:
            # The mixture maths makes several (B, C, H, W, K) intermediates. Storing them for
            # backward costs more memory than the coupling net's own activations at small widths;
            # recomputing them is cheap elementwise work, so only x2 and raw are kept.
            y2, logdet = checkpoint(self._transform, x2, raw, use_reentrant=False)
        else:
            y2, logdet = self._transform(x2, raw)
        return merge_halves(x1, y2.to(x.dtype), self.split), logdet.to(x.dtype)

    def inverse(self, y, cond=None):
        y1, y2 = split_halves(y, self.split)
        a, shift, mix = self._params(y1, cond)
        u = torch.sigmoid((y2.to(a.dtype) - shift) * torch.exp(-a))
        x2 = mixlogistic_inv_cdf(u, *mix)
        return merge_halves(y1, x2.to(y.dtype), self.split)
