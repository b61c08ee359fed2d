"""Memory-lean activations for the coupling nets, as hand-written autograd functions.

A gated conv computes conv(elu([x, -x])) and then x + a * sigmoid(b). Plain autograd
would keep the doubled (B, 2C, H, W) elu output and the (B, 2C', H, W) gate input for
backward; these functions keep only their small inputs (and a bool dropout mask) and
recompute the rest, which is cheap elementwise work plus at most one convolution.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _elu_grad(x: torch.Tensor) -> torch.Tensor:
    """d elu(x) / dx, elementwise, from the input x."""
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
    """(B, C, H, W) -> elu([x, -x]) (B, 2C, H, W), times keep / (1 - p) when a dropout mask is given."""
    e = F.elu(torch.cat([x, -x], dim=1))
    return e if keep is None else e * keep / (1 - p)


def _elu_conv(x, weight, bias, padding, keep, p):
    return F.conv2d(_concat_elu_masked(x, keep, p), weight, bias, padding=padding)


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C, H, W)."""
    return _ConcatELU.apply(x)


def gated_residual(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + a * sigmoid(b) with (a, b) = h split on channels: x (B, C, H, W), h (B, 2C, H, W)."""
    return _GatedResidual.apply(x, h)


_RECOMPUTE = [True]


@contextlib.contextmanager
def plain_autograd():
    """Within it, ``concat_elu_conv`` runs as plain ops that autograd differentiates, keeping their
    activations instead of recomputing the gated convolution in backward: the same values and
    gradients, and FLOPs that count the model's work only (``flowpp.flops`` counts them so)."""
    _RECOMPUTE[0] = False
    try:
        yield
    finally:
        _RECOMPUTE[0] = True


def concat_elu_conv(x, weight, bias, padding, keep=None, p=0.0, residual=None) -> torch.Tensor:
    """conv2d(dropout(elu([x, -x]))) [gated into ``residual``], storing only x and ``keep`` for backward.

    x (B, C, H, W), weight (C', 2C, k, k), keep a bool (B, 2C, H, W) mask or None;
    returns (B, C', H, W), or (B, C'/2, H, W) with ``residual``.
    """
    if _RECOMPUTE[0]:
        return _ConcatELUConv.apply(x, weight, bias, padding, keep, p, residual)
    h = _elu_conv(x, weight, bias, padding, keep, p)
    if residual is None:
        return h
    a, b = h.chunk(2, dim=1)
    return residual + a * torch.sigmoid(b)
