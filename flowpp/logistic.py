"""Mixture-of-logistics densities and their inverse CDF, as pure functions.

Every function takes the mixture parameters with a trailing component axis K:
``logits``, ``means`` and ``log_scales`` are (..., K) and ``x`` or ``y`` is (...).
The maths runs in at least float32 (float64 stays float64), whatever dtype the
parameters arrive in, so that a bf16 coupling net never degrades the logdet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_LOG_SCALE = -7.0
# Quantile of a standard logistic at 1 - 1e-5 is ln(1e5) ~ 11.5; 20 leaves margin.
BRACKET_WIDTH = 20.0


def _promote(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _standardize(x, means, log_scales):
    x, means, log_scales = _promote(x, means, log_scales)
    return (x.unsqueeze(-1) - means) * torch.exp(-log_scales), log_scales


def mixlogistic_log_pdf(x, logits, means, log_scales):
    """log sum_k pi_k Logistic(x; mu_k, s_k), shape (...)."""
    z, log_scales = _standardize(x, means, log_scales)
    log_pi = F.log_softmax(logits.to(z.dtype), dim=-1)
    # log of e^{-z} / (s (1 + e^{-z})^2)
    log_pdf = -z - log_scales - 2.0 * F.softplus(-z)
    return torch.logsumexp(log_pi + log_pdf, dim=-1)


def mixlogistic_log_cdf(x, logits, means, log_scales):
    """log sum_k pi_k sigmoid((x - mu_k) / s_k), shape (...)."""
    z, _ = _standardize(x, means, log_scales)
    log_pi = F.log_softmax(logits.to(z.dtype), dim=-1)
    return torch.logsumexp(log_pi + F.logsigmoid(z), dim=-1)


def mixlogistic_log_sf(x, logits, means, log_scales):
    """log(1 - CDF(x)), computed without cancellation, shape (...)."""
    z, _ = _standardize(x, means, log_scales)
    log_pi = F.log_softmax(logits.to(z.dtype), dim=-1)
    return torch.logsumexp(log_pi + F.logsigmoid(-z), dim=-1)


@torch.no_grad()
def mixlogistic_inv_cdf(
    y: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iters: int = 100,
) -> torch.Tensor:
    """x such that CDF(x) = y, by vectorised bisection in float64.

    y is clamped into (1e-5, 1 - 1e-5) first: outside it the logistic tails make
    the inverse ill-conditioned. Bisection stops when every bracket is narrower
    than ``tol`` or after ``max_iters`` halvings; the result is then within
    max(tol, width / 2**max_iters) of the root. Returns y's dtype.
    """
    out_dtype = torch.promote_types(y.dtype, torch.float32)
    y64 = y.to(torch.float64).clamp(1e-5, 1.0 - 1e-5)
    logits, means, log_scales = (t.to(torch.float64) for t in (logits, means, log_scales))
    # Every component's 1e-5 / 1-1e-5 quantile lies within mu_k +- 11.5 s_k, so the
    # mixture's root lies in [min mu - c sum s, max mu + c sum s].
    spread = BRACKET_WIDTH * torch.exp(log_scales).sum(-1)
    lo = means.amin(-1) - spread
    hi = means.amax(-1) + spread
    log_y = torch.log(y64)
    for _ in range(max_iters):
        mid = 0.5 * (lo + hi)
        below = mixlogistic_log_cdf(mid, logits, means, log_scales) < log_y
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
        if float((hi - lo).max()) < tol:
            break
    return (0.5 * (lo + hi)).to(out_dtype)
