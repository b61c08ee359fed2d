"""Coupling networks: gated convolutions, layer norm, gated multi-head attention.

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


def _elu_grad(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.exp(x.clamp_max(0)))


class _ConcatELU(torch.autograd.Function):
    """elu([x, -x]) that keeps only x for backward, not the doubled (B, 2C, H, W) tensor."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.elu(torch.cat([x, -x], dim=1))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        g_pos, g_neg = grad.chunk(2, dim=1)
        return g_pos * _elu_grad(x) - g_neg * _elu_grad(-x)


class _GatedResidual(torch.autograd.Function):
    """x + a * sigmoid(b) for h = [a, b], keeping only h for backward (sigmoid is recomputed)."""

    @staticmethod
    def forward(ctx, x, h):
        a, b = h.chunk(2, dim=1)
        ctx.save_for_backward(h)
        return x + a * torch.sigmoid(b)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        a, b = h.chunk(2, dim=1)
        s = torch.sigmoid(b)
        return grad, torch.cat([grad * s, grad * a * s * (1 - s)], dim=1)


class _ConcatELUConv(torch.autograd.Function):
    """conv2d(elu([x, -x]) * keep / (1 - p)), optionally gated into a residual: r + a * sigmoid(b).

    Only x and the bool keep-mask are stored for backward. The (B, 2C, H, W) conv input
    and, when gated, the (B, 2C', H, W) conv output are recomputed from x instead: they
    are the largest tensors a gated conv would otherwise keep, and elementwise ops plus
    one convolution rebuild them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding, keep, p, residual=None):
        h = _elu_conv(x, weight, bias, padding, keep, p)
        ctx.save_for_backward(x, weight, bias, keep)
        ctx.conf = (padding, p, h.dtype, residual is not None)
        if residual is None:
            return h
        a, b = h.chunk(2, dim=1)
        return residual + a * torch.sigmoid(b)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, keep = ctx.saved_tensors
        padding, p, dtype, gated = ctx.conf
        e = _concat_elu_masked(x, keep, p).to(dtype)
        g_res = None
        if gated:
            with torch.no_grad():
                h = F.conv2d(e, weight.to(dtype), bias.to(dtype), padding=padding)
            a, b = h.chunk(2, dim=1)
            s = torch.sigmoid(b)
            g_res = grad
            grad = torch.cat([grad * s, grad * a * s * (1 - s)], dim=1)
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        g_e, g_w, g_b = torch.ops.aten.convolution_backward(
            grad.to(dtype), e, weight.to(dtype), [weight.shape[0]], [1, 1], [padding, padding],
            [1, 1], False, [0, 0], 1, mask,
        )  # fmt: skip
        g_x = None
        if g_e is not None:
            if keep is not None:
                g_e = g_e * keep / (1 - p)
            g_pos, g_neg = g_e.to(x.dtype).chunk(2, dim=1)
            g_x = g_pos * _elu_grad(x) - g_neg * _elu_grad(-x)
        g_w = g_w.to(weight.dtype) if g_w is not None else None
        g_b = g_b.to(bias.dtype) if g_b is not None else None
        return g_x, g_w, g_b, None, None, None, g_res


def _concat_elu_masked(x, keep, p):
    e = F.elu(torch.cat([x, -x], dim=1))
    return e if keep is None else e * keep / (1 - p)


def _elu_conv(x, weight, bias, padding, keep, p):
    return F.conv2d(_concat_elu_masked(x, keep, p), weight, bias, padding=padding)


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C, H, W)."""
    return _ConcatELU.apply(x)


def gated_residual(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + a * sigmoid(b) with (a, b) = h split on channels."""
    return _GatedResidual.apply(x, h)


class Conv2d(nn.Module):
    """k x k convolution with data-dependent init and optional weight norm."""

    def __init__(self, c_in, c_out, kernel_size=3, init_scale=1.0, weight_norm=False):
        super().__init__()
        self.weight = nn.Parameter(0.05 * torch.randn(c_out, c_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.gain = nn.Parameter(torch.ones(c_out)) if weight_norm else None
        self.padding = kernel_size // 2
        self.init_scale = init_scale
        self.register_buffer("initialized", torch.tensor(False))

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
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
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
        if not self.initialized:
            self._data_init(_concat_elu_masked(x, keep, dropout))
        return _ConcatELUConv.apply(x, self._effective_weight(), self.bias, self.padding, keep, dropout, residual)


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
    """One block of a coupling net: [gated conv, LN, (gated attention, LN)]."""

    def __init__(self, channels, *, context_channels, attention, num_heads, dropout, use_nin, layer_norm, weight_norm):
        super().__init__()
        self.conv = GatedConv(channels, context_channels, use_nin, dropout, weight_norm)
        self.norm1 = LayerNorm(channels) if layer_norm else nn.Identity()
        self.attn = GatedAttention(channels, num_heads, dropout, weight_norm) if attention else None
        self.norm2 = LayerNorm(channels) if (layer_norm and attention) else nn.Identity()

    def forward(self, x, context=None, pos_emb=None):
        x = self.norm1(self.conv(x, context))
        if self.attn is not None:
            x = self.attend(x, pos_emb)
        return x

    def attend(self, x, pos_emb):
        """The attention block: gated attention, then its layer norm (what ``checkpoint=attention`` wraps)."""
        return self.norm2(self.attn(x, pos_emb))


class CouplingNet(nn.Module):
    """x1 (B, C_in, H, W) [+ context] -> (B, C_out, H, W).

    pos-emb, 3x3 conv to F, N blocks, then a 3x3 conv (init scale 0.1) to C_out,
    optionally preceded by concat_elu as in the ImageNet launchers.
    """

    def __init__(
        self,
        c_in,
        c_out,
        size,
        *,
        hidden,
        num_blocks,
        attention=True,
        num_heads=4,
        dropout=0.0,
        context_channels=0,
        use_nin=True,
        layer_norm=True,
        final_concat_elu=False,
        weight_norm=False,
    ):
        super().__init__()
        h, w = size
        self.pos_emb = nn.Parameter(0.01 * torch.randn(1, hidden, h, w)) if attention else None
        self.proj_in = Conv2d(c_in, hidden, 3, weight_norm=weight_norm)
        self.blocks = nn.ModuleList(
            CouplingBlock(
                hidden,
                context_channels=context_channels,
                attention=attention,
                num_heads=num_heads,
                dropout=dropout,
                use_nin=use_nin,
                layer_norm=layer_norm,
                weight_norm=weight_norm,
            )
            for _ in range(num_blocks)
        )
        self.final_concat_elu = final_concat_elu
        c_last = 2 * hidden if final_concat_elu else hidden
        self.proj_out = Conv2d(c_last, c_out, 3, init_scale=0.1, weight_norm=weight_norm)

    def forward(self, x, context=None):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x, context, self.pos_emb)
        if self.final_concat_elu:
            x = concat_elu(x)
        return self.proj_out(x)


class ContextNet(nn.Module):
    """Dequantizer context: x/L - 0.5 (B, 2C, H, W/2) -> (B, hidden, H, W/2).

    A 3x3 conv to ``hidden`` then ``num_blocks`` of [gated conv (3x3 both), (LN),
    (attention, LN)], as the official launchers' context processors.
    """

    def __init__(
        self,
        c_in,
        size,
        *,
        hidden=32,
        num_blocks=3,
        layer_norm=False,
        attention=False,
        num_heads=4,
        dropout=0.0,
        weight_norm=False,
    ):
        super().__init__()
        h, w = size
        self.pos_emb = nn.Parameter(0.01 * torch.randn(1, hidden, h, w)) if attention else None
        self.proj_in = Conv2d(c_in, hidden, 3, weight_norm=weight_norm)
        self.blocks = nn.ModuleList(
            CouplingBlock(
                hidden,
                context_channels=0,
                attention=attention,
                num_heads=num_heads,
                dropout=dropout,
                use_nin=False,
                layer_norm=layer_norm,
                weight_norm=weight_norm,
            )
            for _ in range(num_blocks)
        )

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x, None, self.pos_emb)
        return x
