"""Mixture-of-logistics densities and their inverse CDF, as pure functions.

Every function takes the mixture parameters with a trailing component axis K:
``logits``, ``means`` and ``log_scales`` are (..., K) and ``x`` or ``y`` is (...).
The maths runs in at least float32 (float64 stays float64), whatever dtype the
parameters arrive in, so that a bf16 coupling net never degrades the logdet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

MIN_LOG_SCALE = -7.0
# The bisection reference's bracket: mu_k +- 20 s_k around every component holds its
# 1e-5 and 1 - 1e-5 quantiles (ln(1e5) ~ 11.5 scales out).
BRACKET_WIDTH = 20.0
Y_MIN = 1e-5  # the inverse CDF clamps y into (Y_MIN, 1 - Y_MIN)
# The solver checks for convergence (one host sync) after iterations 2, 3, 4, 6, 8, ...
FIRST_CHECKS, CHECK_EVERY = (2, 3, 4), 2
# Elements unconverged after this many iterations also try the staircase guess, once.
# It must be one of the checks above.
STAIRCASE_AT = 4
# A float32 iterate counts as converged once |logit CDF(x) - logit y| is below this many
# float32 epsilons: float32 evaluation of the residual cannot resolve it any further.
FLOAT32_RESIDUAL_EPS = 16.0


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


# -- inverse CDF --------------------------------------------------------------------------


class _Mixture(NamedTuple):
    """The flattened mixture the solver iterates on: (N, K) components, (N,) targets."""

    weights: torch.Tensor  # (N, K) pi_k
    means: torch.Tensor  # (N, K) mu_k
    inv_scales: torch.Tensor  # (N, K) 1 / s_k
    weights_over_scales: torch.Tensor  # (N, K) pi_k / s_k
    target: torch.Tensor  # (N,) logit(y)

    def take(self, idx: torch.Tensor) -> _Mixture:
        return _Mixture(*(t[idx] for t in self))


@dataclass
class InverseCdfInfo:
    """How :func:`solve_mixlogistic_inv_cdf` got there."""

    evaluations: torch.Tensor
    """(...) int32: residual evaluations each element took, float32 and float64 passes together:
    one per iteration, plus one where the staircase guess was tried."""
    converged: torch.Tensor
    """(...) bool: whether each element met the convergence test within ``max_iters``."""
    num_redone_in_float64: int
    """Elements the float32 pass left unconverged and the float64 pass redid (0 for float64 work)."""


def _prepare(y, logits, means, log_scales, dtype: torch.dtype) -> tuple[_Mixture, torch.Size]:
    """The solver's mixture in ``dtype``, flattened to N elements, and the batch shape."""
    k = logits.shape[-1]
    batch = torch.broadcast_shapes(y.shape, logits.shape[:-1], means.shape[:-1], log_scales.shape[:-1])
    logits, means, log_scales = (t.to(dtype).expand(*batch, k).reshape(-1, k) for t in (logits, means, log_scales))
    # logit(y) in float64 whatever the work dtype: 1 - y is exact there, which keeps the
    # tail targets right for y near 1 - Y_MIN (float32 cannot hold 1 - 1e-5 closely).
    y64 = y.to(torch.float64).expand(batch).reshape(-1).clamp(Y_MIN, 1.0 - Y_MIN)
    target = (torch.log(y64) - torch.log1p(-y64)).to(dtype)
    weights, inv_scales = torch.softmax(logits, dim=-1), torch.exp(-log_scales)
    return _Mixture(weights, means, inv_scales, weights * inv_scales, target), batch


def _bracket_and_guess(mix: _Mixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, hi, x0), each (N,), from the components' own quantiles q_k = mu_k + s_k logit y.

    The CDF is a convex combination of the component CDFs, and at min_k q_k every one of
    them is <= y, at max_k q_k every one is >= y: the root lies in between. The initial
    guess is the mixture-weighted quantile sum_k pi_k q_k (exact for one component).
    """
    q = mix.means + mix.target.unsqueeze(-1) / mix.inv_scales  # (N, K)
    return q.amin(-1), q.amax(-1), (mix.weights * q).sum(-1)


def _staircase_guess(mix: _Mixture) -> torch.Tensor:
    """The root if the components did not overlap: the CDF then rises through one component
    at a time, in the order of their means, so y falls within one component's rise."""
    means, order = mix.means.sort(-1)  # (N, K)
    weights, inv_scales = mix.weights.gather(-1, order), mix.inv_scales.gather(-1, order)
    cum = weights.cumsum(-1)  # the CDF just above each component
    y = torch.sigmoid(mix.target).unsqueeze(-1)  # (N, 1)
    j = (cum < y).sum(-1, keepdim=True).clamp(max=means.shape[-1] - 1)
    w = weights.gather(-1, j).clamp_min(torch.finfo(means.dtype).tiny)
    u = ((y - cum.gather(-1, j) + w) / w).clamp(Y_MIN, 1.0 - Y_MIN)  # the level within component j
    return (means.gather(-1, j) + torch.logit(u) / inv_scales.gather(-1, j)).squeeze(-1)


def _residual_and_slope(x: torch.Tensor, mix: _Mixture) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) = logit CDF(x) - logit y and f'(x) = pdf / CDF + pdf / (1 - CDF), each (N,).

    Sums of positive terms in probability space: CDF and 1 - CDF are both formed without
    cancellation and are >= Y_MIN near the root, so nothing there underflows. Far from the
    root CDF or 1 - CDF may underflow to 0 (f = -+inf): its sign, all the bracket uses,
    stays right, and the Newton step comes out NaN, which the safeguard rejects.
    """
    z = (x.unsqueeze(-1) - mix.means) * mix.inv_scales  # (N, K)
    below, above = torch.sigmoid(z), torch.sigmoid(-z)
    cdf = (mix.weights * below).sum(-1)
    sf = (mix.weights * above).sum(-1)
    pdf = (mix.weights_over_scales * below * above).sum(-1)
    return torch.log(cdf) - torch.log(sf) - mix.target, pdf / cdf + pdf / sf


class _State(NamedTuple):
    """The solver's per-element state, each (N,)."""

    x: torch.Tensor  # the current iterate
    lo: torch.Tensor  # the bracket: f(lo) <= 0 <= f(hi)
    hi: torch.Tensor
    step1: torch.Tensor  # the length of the last step
    step2: torch.Tensor  # and of the one before
    done: torch.Tensor  # bool: converged, x frozen
    evals: torch.Tensor  # int32: evaluations of f so far

    def take(self, idx: torch.Tensor) -> _State:
        return _State(*(t[idx] for t in self))


class _Candidate(NamedTuple):
    """A second point to evaluate for the elements ``idx`` of the state, with their mixtures."""

    idx: torch.Tensor
    x: torch.Tensor
    mix: _Mixture


def _staircase_candidate(mix: _Mixture, s: _State) -> _Candidate | None:
    """The staircase guess, for the elements whose bracket it falls strictly inside."""
    guess = _staircase_guess(mix)
    inside = ((guess > s.lo) & (guess < s.hi)).nonzero().squeeze(1)
    return _Candidate(inside, guess[inside], mix.take(inside)) if inside.numel() else None


def _iterate(mix: _Mixture, s: _State, *, tol: float, ftol: float, cand: _Candidate | None = None) -> _State:
    """One safeguarded Newton iteration (see :func:`_safeguarded_newton`); done elements stay put."""
    f, slope = _residual_and_slope(s.x, mix)
    x, lo, hi = s.x, torch.where(f <= 0, s.x, s.lo), torch.where(f >= 0, s.x, s.hi)
    step2, evals = s.step2, s.evals + (~s.done).int()
    if cand is not None:
        # Its sign narrows the bracket too; go on from whichever point has the smaller |f|.
        i, xc = cand.idx, cand.x
        fc, slope_c = _residual_and_slope(xc, cand.mix)
        lo_i, hi_i = lo[i], hi[i]
        lo = lo.index_copy(0, i, torch.where((fc <= 0) & (xc > lo_i), xc, lo_i))
        hi = hi.index_copy(0, i, torch.where((fc >= 0) & (xc < hi_i), xc, hi_i))
        better = fc.abs() < f[i].abs()
        x = x.index_copy(0, i, torch.where(better, xc, x[i]))
        f = f.index_copy(0, i, torch.where(better, fc, f[i]))
        slope = slope.index_copy(0, i, torch.where(better, slope_c, slope[i]))
        step2 = step2.index_copy(0, i, torch.where(better, hi[i] - lo[i], step2[i]))  # no step history there
        evals = evals.index_add(0, i, torch.ones_like(i, dtype=evals.dtype))
    newton = x - f / slope
    ok = (newton >= lo) & (newton <= hi) & ((newton - x).abs() <= 0.5 * step2)  # NaN: not ok
    at_floor = f.abs() <= ftol  # x is as good as the dtype can tell: no bisection away from it
    x_next = torch.where(ok, newton, torch.where(at_floor, x, 0.5 * (lo + hi)))
    step = (x_next - x).abs()
    xtol = tol + 2 * torch.finfo(x.dtype).eps * x.abs()
    converged = (step <= xtol) | (hi - lo <= xtol) | at_floor
    return _State(torch.where(s.done, s.x, x_next), lo, hi, step, s.step1, s.done | converged, evals)


def _is_check(taken: int, max_iters: int) -> bool:
    return taken == max_iters or taken in FIRST_CHECKS or (taken > FIRST_CHECKS[-1] and taken % CHECK_EVERY == 0)


def _safeguarded_newton(
    mix: _Mixture, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, tol: float, max_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve f(x) = logit CDF(x) - logit y = 0 on [lo, hi] by Newton steps with a bisection fallback.

    Each iteration evaluates f at x and moves lo or hi to x by its sign, so [lo, hi] keeps
    bracketing the root. The Newton step is taken when it lands inside the bracket and is at
    most half the step taken two iterations before (as in Numerical Recipes' rtsafe);
    otherwise x moves to the bracket's midpoint. Each iteration thus either halves the
    bracket or takes a step at most half as long as the one two before, so the iteration
    cannot stall; near the root Newton converges quadratically, and on the logit scale from
    afar too: logit CDF is exactly linear for one component, asymptotically so in the tails.

    An element is converged once its step is at most ``tol + 2 eps |x|``, its bracket is
    that narrow, or ``|f|`` is at the float32 rounding floor (float32 only); it is then
    frozen. Convergence is checked on the host only after the iterations in FIRST_CHECKS and
    then every CHECK_EVERY; after each check only unconverged elements are carried on.
    Newton is slow on mixtures of narrow, separated components, where the staircase guess is
    nearly exact: in iteration STAIRCASE_AT, the elements still unconverged also evaluate it
    (where it lies inside their bracket) and go on from the better point.

    Returns x, converged and the evaluations of f, per element, each (N,).
    """
    ftol = FLOAT32_RESIDUAL_EPS * torch.finfo(torch.float32).eps if x.dtype == torch.float32 else 0.0
    n = x.shape[0]
    false, zero = torch.zeros(n, dtype=torch.bool, device=x.device), torch.zeros(n, dtype=torch.int32, device=x.device)
    state = _State(x, lo, hi, hi - lo, hi - lo, false, zero)
    out = _State(*(t.clone() for t in state))
    idx = torch.arange(n, device=x.device)
    for it in range(max_iters):
        # STAIRCASE_AT follows a check, so every element still in the state is unconverged
        cand = _staircase_candidate(mix, state) if it == STAIRCASE_AT else None
        state = _iterate(mix, state, tol=tol, ftol=ftol, cand=cand)
        if not _is_check(it + 1, max_iters):
            continue
        for o, t in zip(out, state, strict=True):
            o[idx] = t
        keep = (~state.done).nonzero().squeeze(1)  # the host sync, once per check
        if keep.numel() == 0:
            break
        if keep.numel() < idx.numel():
            idx, mix, state = idx[keep], mix.take(keep), state.take(keep)
    return out.x, out.done, out.evals


@torch.no_grad()
def solve_mixlogistic_inv_cdf(
    y: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iters: int = 100,
) -> tuple[torch.Tensor, InverseCdfInfo]:
    """:func:`mixlogistic_inv_cdf`, and how it converged: evaluations per element and float64 redos."""
    out_dtype = work = torch.promote_types(y.dtype, torch.float32)
    for t in (logits, means, log_scales):
        work = torch.promote_types(work, t.dtype)
    mix, batch = _prepare(y, logits, means, log_scales, work)
    lo, hi, x0 = _bracket_and_guess(mix)
    x, done, evals = _safeguarded_newton(mix, x0, lo, hi, tol=tol, max_iters=max_iters)
    redo = (~done).nonzero().squeeze(1) if work != torch.float64 else done.new_zeros(0, dtype=torch.long)
    if redo.numel() > 0:
        # Where float32 could not resolve the root, solve again in float64 from its answer.
        k = logits.shape[-1]
        sub_logits, sub_means, sub_log_scales = (
            t.expand(*batch, k).reshape(-1, k)[redo] for t in (logits, means, log_scales)
        )
        mix64, _ = _prepare(y.expand(batch).reshape(-1)[redo], sub_logits, sub_means, sub_log_scales, torch.float64)
        lo64, hi64, _ = _bracket_and_guess(mix64)
        x0 = torch.minimum(torch.maximum(x[redo].double(), lo64), hi64)
        x64, done64, evals64 = _safeguarded_newton(mix64, x0, lo64, hi64, tol=tol, max_iters=max_iters)
        x[redo], done[redo], evals[redo] = x64.to(x.dtype), done64, evals[redo] + evals64
    info = InverseCdfInfo(evals.reshape(batch), done.reshape(batch), redo.numel())
    return x.reshape(batch).to(out_dtype), info


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
    """x such that CDF(x) = y, by a safeguarded Newton iteration on logit CDF(x) = logit y.

    y is clamped into (Y_MIN, 1 - Y_MIN) first: outside it the logistic tails make the
    inverse ill-conditioned.

    The root is bracketed by the components' own quantiles of y, and the iteration starts
    from their mixture-weighted mean. Each iteration narrows the bracket by the sign of the
    residual and takes the Newton step, or bisects where that step would leave the bracket
    or is not shrinking fast enough (:func:`_safeguarded_newton`). Typical mixtures converge
    in 2-5 iterations; the bisection fallback bounds the rest (extreme mixtures: <= ~25).

    Guarantees: x always lies inside the bracket, which always holds the root (up to the
    rounding of the residual's sign). An element converges when its last step or its bracket
    is at most ``tol + 2 ulp(x)`` (the Newton step it then takes leaves an error far below
    that), or, in float32, when |logit CDF(x) - logit y| is within FLOAT32_RESIDUAL_EPS
    float32 epsilons, as close as float32 evaluation can tell. In float32, where ``tol`` is
    below the resolution, that makes the result as accurate as float32 allows.

    Precision: the work is float64 if y or a parameter is float64, else float32 (bf16
    parameters are cast up). Float32 elements that have not converged within ``max_iters``
    iterations are redone in float64, from the float32 answer; ``max_iters`` caps each pass.
    Vectorised over all elements; the host syncs only at the convergence checks (after
    iterations 2, 3, 4, 6, 8, ...) and once to pick the elements that try the staircase
    guess. Returns promote(y.dtype, float32), in the broadcast shape of y and the mixture.
    """
    return solve_mixlogistic_inv_cdf(y, logits, means, log_scales, tol=tol, max_iters=max_iters)[0]


@torch.no_grad()
def _inv_cdf_bisect(
    y: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iters: int = 100,
) -> torch.Tensor:
    """The reference inverse: vectorised bisection in float64 (the former implementation).

    Stops when every bracket is narrower than ``tol`` or after ``max_iters`` halvings; the
    result is then within max(tol, width / 2**max_iters) of the root. Returns y's dtype
    promoted to float32. Slow (a host sync per halving); kept for tests.
    """
    out_dtype = torch.promote_types(y.dtype, torch.float32)
    y64 = y.to(torch.float64).clamp(Y_MIN, 1.0 - Y_MIN)
    logits, means, log_scales = (t.to(torch.float64) for t in (logits, means, log_scales))
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
