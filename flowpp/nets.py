"""Coupling networks: gated convolutions, layer norm, gated multi-head attention.

Reads top to bottom: the convolution, norm, gated conv and gated attention, one block
of them, the trunk (pos-emb, 3x3 conv in, N blocks) that the coupling net and the
dequantizer's context net share, then those two nets.

Every convolution is data-dependently initialised on its first forward pass
(output zero mean, ``init_scale`` std per channel), as in the official code, and
may use weight normalisation (the ImageNet 32x32 model does).
Attention runs through ``scaled_dot_product_attention``: the (T, T) weight map
is never materialised, which is what makes 64x64 attention affordable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowpp.datainit import DataInit
from flowpp.ops import _concat_elu_masked, concat_elu, concat_elu_conv, gated_residual
from flowpp.presets import ContextConfig, NetConfig


class Conv2d(DataInit):
    """k x k convolution with data-dependent init and optional weight norm."""

    def __init__(self, c_in, c_out, kernel_size=3, init_scale=1.0, weight_norm=False):
        super().__init__()
        self.weight = nn.Parameter(0.05 * torch.randn(c_out, c_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.gain = nn.Parameter(torch.ones(c_out)) if weight_norm else None
        self.padding = kernel_size // 2
        self.init_scale = init_scale

    def _effective_weight(self) -> torch.Tensor:
        if self.gain is None:
            return self.weight
        norm = self.weight.flatten(1).norm(dim=1).clamp_min(1e-12)
        return self.weight * (self.gain / norm)[:, None, None, None]

    @torch.no_grad()
    def _data_init(self, x: torch.Tensor) -> None:
        y = F.conv2d(x, self._effective_weight(), None, padding=self.padding)
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
        scale = self.init_scale * torch.rsqrt(var + 1e-8)
        target = self.gain if self.gain is not None else self.weight
        target.mul_(scale.view(-1, *[1] * (target.dim() - 1)))
        self.bias.copy_(-mean * scale)
        self.mark_initialized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.needs_init():
            self._data_init(x)
        return F.conv2d(x, self._effective_weight(), self.bias, padding=self.padding)

    def forward_elu(self, x: torch.Tensor, dropout: float = 0.0, residual: torch.Tensor | None = None):
        """self(dropout(concat_elu(x))), storing only x (and a bool mask) for backward.

        With ``residual``: gated_residual(residual, self(dropout(concat_elu(x)))), still storing only x.
        """
        keep = None
        if dropout > 0 and self.training:
            b, c, h, w = x.shape
            keep = torch.rand(b, 2 * c, h, w, device=x.device) >= dropout
        if self.needs_init():
            self._data_init(_concat_elu_masked(x, keep, dropout))
        return concat_elu_conv(x, self._effective_weight(), self.bias, self.padding, keep, dropout, residual)


class LayerNorm(nn.Module):
    """Layer norm over the channel axis of (B, C, H, W), as the official ``norm``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class GatedConv(nn.Module):
    """x + gate(conv(concat_elu(conv(concat_elu(x)) [+ nin(concat_elu(context))])))."""

    def __init__(self, channels, context_channels=0, use_nin=True, dropout=0.0, weight_norm=False):
        super().__init__()
        self.conv_in = Conv2d(2 * channels, channels, 3, weight_norm=weight_norm)
        self.context_proj = (
            Conv2d(2 * context_channels, channels, 1, weight_norm=weight_norm) if context_channels else None
        )
        self.dropout = dropout
        k = 1 if use_nin else 3
        self.conv_out = Conv2d(2 * channels, 2 * channels, k, init_scale=0.1, weight_norm=weight_norm)

    def forward(self, x, context=None):
        h = self.conv_in.forward_elu(x)
        if self.context_proj is not None:
            h = h + self.context_proj.forward_elu(context)
        return self.conv_out.forward_elu(h, self.dropout, residual=x)


class GatedAttention(nn.Module):
    """x + gate(nin(MHA(nin(x + pos_emb)))), multi-head self-attention over H*W positions."""

    def __init__(self, channels, num_heads=4, dropout=0.0, weight_norm=False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = Conv2d(channels, 3 * channels, 1, weight_norm=weight_norm)
        self.dropout = nn.Dropout(dropout)
        self.proj = Conv2d(channels, 2 * channels, 1, init_scale=0.1, weight_norm=weight_norm)

    def forward(self, x, pos_emb):
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(x + pos_emb)  # (B, 3C, H, W)
        qkv = qkv.reshape(b, 3, heads, d, h * w).permute(1, 0, 2, 4, 3)  # (3, B, heads, T, d)
        # contiguous (T, d) blocks keep SDPA on its fused kernels, which never build the (T, T) map
        q, k, v = (t.contiguous() for t in qkv)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return gated_residual(x, self.proj(self.dropout(out)))


class CouplingBlock(nn.Module):
    """One block of a coupling net: [gated conv, LN, (gated attention, LN)], (B, F, H, W) -> same."""

    def __init__(self, net: NetConfig, *, dropout=0.0, context_channels=0):
        super().__init__()
        f = net.hidden
        self.conv = GatedConv(f, context_channels, net.use_nin, dropout, net.weight_norm)
        self.norm1 = LayerNorm(f) if net.layer_norm else nn.Identity()
        self.attn = GatedAttention(f, net.num_heads, dropout, net.weight_norm) if net.attention else None
        self.norm2 = LayerNorm(f) if (net.layer_norm and net.attention) else nn.Identity()

    def forward(self, x, context=None, pos_emb=None):
        x = self.norm1(self.conv(x, context))
        if self.attn is not None:
            x = self.attend(x, pos_emb)
        return x

    def attend(self, x, pos_emb):
        """The attention block: gated attention, then its layer norm (what ``checkpoint=attention`` wraps)."""
        return self.norm2(self.attn(x, pos_emb))


class Trunk(nn.Module):
    """x (B, C_in, H, W) [+ context (B, C_ctx, H, W)] -> features (B, F, H, W).

    pos-emb (attention only), a 3x3 conv to F, then ``net.num_blocks`` blocks. The
    coupling net and the context net are both this trunk; they subclass it, rather
    than hold it, so that their parameters keep their names (``proj_in.weight``,
    ``blocks.0...``) and are created in the same order, i.e. from the same RNG draws.
    """

    def __init__(self, c_in, size, net: NetConfig, *, dropout=0.0, context_channels=0):
        super().__init__()
        h, w = size
        self.pos_emb = nn.Parameter(0.01 * torch.randn(1, net.hidden, h, w)) if net.attention else None
        self.proj_in = Conv2d(c_in, net.hidden, 3, weight_norm=net.weight_norm)
        self.blocks = nn.ModuleList(
            CouplingBlock(net, dropout=dropout, context_channels=context_channels) for _ in range(net.num_blocks)
        )

    def forward(self, x, context=None):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x, context, self.pos_emb)
        return x


class CouplingNet(Trunk):
    """x1 (B, C_in, H, W) [+ context] -> (B, C_out, H, W).

    The trunk, then a 3x3 conv (init scale 0.1) to C_out, optionally preceded by
    concat_elu as in the ImageNet launchers.
    """

    def __init__(self, c_in, c_out, size, *, net: NetConfig, dropout=0.0, context_channels=0):
        super().__init__(c_in, size, net, dropout=dropout, context_channels=context_channels)
        self.final_concat_elu = net.final_concat_elu
        c_last = 2 * net.hidden if net.final_concat_elu else net.hidden
        self.proj_out = Conv2d(c_last, c_out, 3, init_scale=0.1, weight_norm=net.weight_norm)

    def forward(self, x, context=None):
        x = super().forward(x, context)
        if self.final_concat_elu:
            x = concat_elu(x)
        return self.proj_out(x)


def _context_trunk(cfg: ContextConfig, weight_norm: bool) -> NetConfig:
    """The trunk a context config describes: its gated convs are 3x3 throughout (no 1x1 nin),
    as the official context processors; weight norm follows the dequantizer's coupling nets."""
    return NetConfig(
        hidden=cfg.hidden,
        num_blocks=cfg.num_blocks,
        num_heads=cfg.num_heads,
        attention=cfg.attention,
        use_nin=False,
        layer_norm=cfg.layer_norm,
        weight_norm=weight_norm,
    )


class ContextNet(Trunk):
    """Dequantizer context: x/L - 0.5 (B, 2C, H, W/2) -> (B, hidden, H, W/2).

    The trunk alone: a 3x3 conv to ``cfg.hidden``, then ``cfg.num_blocks`` of
    [gated conv (3x3 both), (LN), (attention, LN)], as the official launchers' context processors.
    """

    def __init__(self, c_in, size, cfg: ContextConfig, *, dropout=0.0, weight_norm=False):
        super().__init__(c_in, size, _context_trunk(cfg, weight_norm), dropout=dropout)

    def forward(self, x):
        return super().forward(x)
