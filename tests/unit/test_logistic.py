import math

import pytest
import torch

from flowpp.logistic import (
    MIN_LOG_SCALE,
    Y_MIN,
    _inv_cdf_bisect,
    mixlogistic_inv_cdf,
    mixlogistic_log_cdf,
    mixlogistic_log_pdf,
    mixlogistic_log_sf,
    solve_mixlogistic_inv_cdf,
)

pytestmark = pytest.mark.unit


def _params(shape, k, mean_spread=1.0, log_scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, k, generator=g, dtype=torch.float64)
    means = mean_spread * torch.randn(*shape, k, generator=g, dtype=torch.float64)
    if log_scale is None:
        log_scales = torch.randn(*shape, k, generator=g, dtype=torch.float64).clamp_min(MIN_LOG_SCALE)
    else:
        log_scales = torch.full((*shape, k), float(log_scale), dtype=torch.float64)
    return logits, means, log_scales


def test_pdf_is_derivative_of_cdf():
    params = _params((50,), 5)
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    cdf = mixlogistic_log_cdf(x, *params).exp()
    (grad,) = torch.autograd.grad(cdf.sum(), x)
    torch.testing.assert_close(grad.log(), mixlogistic_log_pdf(x.detach(), *params), rtol=1e-9, atol=1e-9)


def test_cdf_and_survival_sum_to_one():
    params = _params((200,), 7, mean_spread=5.0)
    x = 10 * torch.randn(200, dtype=torch.float64)
    total = mixlogistic_log_cdf(x, *params).exp() + mixlogistic_log_sf(x, *params).exp()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_single_component_matches_torch_logistic():
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    mu, s = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    params = (torch.zeros(9, 1, dtype=torch.float64), mu.expand(9, 1), s.log().expand(9, 1))
    expected_cdf = torch.sigmoid((x - mu) / s)
    torch.testing.assert_close(mixlogistic_log_cdf(x, *params).exp(), expected_cdf)


@pytest.mark.parametrize(
    "case",
    [
        dict(mean_spread=1.0, log_scale=None),
        dict(mean_spread=1.0, log_scale=MIN_LOG_SCALE),  # scales at the -7 floor: steep CDFs
        dict(mean_spread=50.0, log_scale=None),  # widely spread means
        dict(mean_spread=50.0, log_scale=MIN_LOG_SCALE),
        dict(mean_spread=0.01, log_scale=3.0),  # broad, overlapping components
    ],
)
def test_inverse_cdf_recovers_x(case):
    tol = 1e-10
    params = _params((4000,), 8, **case)
    _, means, log_scales = params
    # x around the components, so y covers the bulk and both tails
    pick = torch.randint(0, 8, (4000, 1))
    spread = log_scales.exp().gather(1, pick).squeeze(1)
    x = means.gather(1, pick).squeeze(1) + spread * 8 * torch.randn(4000, dtype=torch.float64)
    y = mixlogistic_log_cdf(x, *params).exp()
    keep = (y > 1e-5) & (y < 1 - 1e-5)
    assert keep.float().mean() > 0.5
    x_hat = mixlogistic_inv_cdf(y[keep], *(p[keep] for p in params), tol=tol)
    # The root is found to tol. x itself is the root only up to the float64 rounding
    # of y (~1e-16), which moves it by ~1e-16 / pdf(x) where the CDF is flat.
    pdf = mixlogistic_log_pdf(x[keep], *(p[keep] for p in params)).exp()
    allowed = tol + 4e-15 / pdf
    assert ((x_hat - x[keep]).abs() <= allowed).all()
    assert (x_hat - x[keep]).abs().median() < 1e-12


def test_inverse_cdf_extreme_y_is_clamped_and_finite():
    params = _params((6,), 4)
    y = torch.tensor([0.0, 1e-12, 1e-5, 0.5, 1 - 1e-12, 1.0], dtype=torch.float64)
    x = mixlogistic_inv_cdf(y, *params)
    assert torch.isfinite(x).all()
    y_back = mixlogistic_log_cdf(x, *params).exp()
    torch.testing.assert_close(y_back, y.clamp(1e-5, 1 - 1e-5), rtol=1e-6, atol=1e-9)


def test_inverse_cdf_respects_iteration_cap():
    params = _params((10,), 3, mean_spread=3.0)
    y = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rough, info = solve_mixlogistic_inv_cdf(y, *params, max_iters=1)
    fine = mixlogistic_inv_cdf(y, *params)
    assert (rough - fine).abs().max() > 1e-6  # one Newton step from the initial guess cannot converge
    assert not info.converged.all() and int(info.evaluations.max()) == 1
    assert torch.isfinite(rough).all()


# -- the solver against its guarantees and the bisection reference -----------------------------


def _root_error(x_hat, y, params):
    """|CDF(x_hat) - y| in float64, and what it may be: pdf(x_hat) times the x error allowed
    (tol in float64, the float32 resolution of x in float32) plus an evaluation floor of
    eps * y (1 - y) (a few ulps of logit y)."""
    x64, p64 = x_hat.double(), [p.double() for p in params]
    y64 = y.double().clamp(Y_MIN, 1 - Y_MIN)
    log_cdf, log_sf = mixlogistic_log_cdf(x64, *p64), mixlogistic_log_sf(x64, *p64)
    # above y = 1/2, compare survival functions: 1 - y and sf(x) keep their precision there
    err = torch.where(y64 < 0.5, log_cdf.exp() - y64, (1 - y64) - log_sf.exp()).abs()
    pdf = mixlogistic_log_pdf(x64, *p64).exp()
    if x_hat.dtype == torch.float64:
        return err, pdf * 1e-10 + 1e-15 * y64 * (1 - y64)
    eps = torch.finfo(torch.float32).eps
    return err, 8 * (pdf * eps * x64.abs() + eps * y64 * (1 - y64))


def _assert_root(x_hat, y, params):
    err, allowed = _root_error(x_hat, y, params)
    worst = int((err / allowed).argmax())
    assert (err <= allowed).all(), (float(err.flatten()[worst]), float(allowed.flatten()[worst]))


def _assert_matches_bisection(x_hat, y, params):
    """Within the reference's own error (tol 1e-10, or float32 rounding) plus what the rounding
    of the residual allows where the CDF is flat."""
    ref = _inv_cdf_bisect(y, *params)
    x64, p64 = x_hat.double(), [p.double() for p in params]
    pdf = mixlogistic_log_pdf(x64, *p64).exp()
    y64 = y.double().clamp(Y_MIN, 1 - Y_MIN)
    if x_hat.dtype == torch.float64:
        allowed = 2e-10 + 1e-15 * y64 * (1 - y64) / pdf
    else:
        eps = torch.finfo(torch.float32).eps
        allowed = 8 * eps * (x64.abs() + y64 * (1 - y64) / pdf)
    assert ((x64 - ref.double()).abs() <= allowed).all()


def _mixture(n, k, *, spread=1.0, log_scale=None, logit_scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = logit_scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    means = spread * torch.randn(n, k, generator=g, dtype=torch.float64)
    if log_scale is None:
        log_scales = torch.randn(n, k, generator=g, dtype=torch.float64)
    else:
        log_scales = float(log_scale) + 0.0 * means
    y = torch.rand(n, generator=g, dtype=torch.float64)
    return y.to(dtype), [t.to(dtype) for t in (logits, means, log_scales.clamp_min(MIN_LOG_SCALE))]


EXTREME = {
    "spread_means": dict(spread=50.0),
    "tiny_scales": dict(log_scale=MIN_LOG_SCALE),
    "spread_tiny": dict(spread=50.0, log_scale=MIN_LOG_SCALE),
    "broad_overlapping": dict(spread=0.01, log_scale=3.0),
    "peaked_weights": dict(logit_scale=8.0),  # one or two components carry nearly all the mass
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(EXTREME))
def test_extreme_mixtures(name, dtype):
    y, params = _mixture(2000, 32, dtype=dtype, **EXTREME[name])
    x_hat, info = solve_mixlogistic_inv_cdf(y, *params)
    assert x_hat.dtype == dtype and info.converged.all()
    _assert_root(x_hat, y, params)
    _assert_matches_bisection(x_hat, y, params)
    assert int(info.evaluations.max()) <= 30  # the bisection fallback bounds even these


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_y_at_and_beyond_the_clamp(dtype):
    y0, params = _mixture(6, 32, spread=50.0, log_scale=MIN_LOG_SCALE, dtype=dtype)
    y = torch.tensor([0.0, 1e-7, Y_MIN, 1 - Y_MIN, 1 - 1e-7, 1.0], dtype=dtype)
    x_hat = mixlogistic_inv_cdf(y, *params)
    assert torch.isfinite(x_hat).all()
    _assert_root(x_hat, y, params)
    _assert_matches_bisection(x_hat, y, params)


def test_one_dominant_component_among_negligible_ones():
    y, (logits, means, log_scales) = _mixture(1000, 32, spread=20.0, log_scale=-3.0)
    logits = torch.full_like(logits, -40.0)
    logits[:, 0] = 0.0  # the other 31 weigh e^-40 each
    params = [logits, means, log_scales]
    x_hat, info = solve_mixlogistic_inv_cdf(y, *params)
    _assert_root(x_hat, y, params)
    # it is that component's own quantile, found in one or two Newton steps
    torch.testing.assert_close(x_hat, means[:, 0] + log_scales[:, 0].exp() * torch.logit(y), rtol=0, atol=1e-12)
    assert int(info.evaluations.max()) <= 3


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32])
def test_low_precision_parameters_are_solved_in_float32(param_dtype):
    y, params = _mixture(3000, 32, dtype=torch.float32)
    params = [p.to(param_dtype) for p in params]
    x_hat, info = solve_mixlogistic_inv_cdf(y, *params)
    assert x_hat.dtype == torch.float32 and info.num_redone_in_float64 == 0
    _assert_root(x_hat, y, params)
    _assert_matches_bisection(x_hat, y, params)


def test_output_dtype_and_shape_follow_y():
    y, params = _mixture(24, 4)
    shaped = [p.reshape(2, 3, 4, 4) for p in params]
    assert mixlogistic_inv_cdf(y.reshape(2, 3, 4), *shaped).shape == (2, 3, 4)
    assert mixlogistic_inv_cdf(y.float(), *params).dtype == torch.float32
    assert mixlogistic_inv_cdf(y.bfloat16(), *params).dtype == torch.float32
    assert mixlogistic_inv_cdf(y, *(p.float() for p in params)).dtype == torch.float64
    assert mixlogistic_inv_cdf(y[:0], *(p[:0] for p in params)).shape == (0,)


def test_random_mixtures_property():
    """50 random mixtures: K, mean spread, scales, weights peakedness, size and dtype all drawn."""
    g = torch.Generator().manual_seed(1234)

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    for draw in range(50):
        k, n = int(torch.randint(1, 33, (), generator=g)), int(torch.randint(1, 400, (), generator=g))
        dtype = (torch.float32, torch.float64)[draw % 2]
        y, (logits, means, log_scales) = _mixture(
            n, k, spread=10 ** uniform(-2, math.log10(50)), logit_scale=uniform(0, 5), dtype=dtype, seed=draw
        )
        log_scales = (uniform(MIN_LOG_SCALE, 3) + uniform(0, 2) * log_scales).clamp(MIN_LOG_SCALE, 5)
        params = [logits, means, log_scales]
        x_hat, info = solve_mixlogistic_inv_cdf(y, *params)
        assert info.converged.all(), draw
        _assert_root(x_hat, y, params)
        _assert_matches_bisection(x_hat, y, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case",
    [
        dict(spread=0.1, log_scale=-0.5),  # a coupling layer near its init
        dict(spread=1.0, log_scale=-1.0),
        dict(spread=1.0),  # scales e^N(0, 1)
        dict(spread=3.0, logit_scale=3.0),
    ],
)
def test_converges_in_a_handful_of_iterations_on_typical_mixtures(case, dtype):
    y, params = _mixture(5000, 32, dtype=dtype, **case)
    _, info = solve_mixlogistic_inv_cdf(y, *params)
    evals = info.evaluations.float()
    assert info.converged.all()
    assert evals.mean() <= 5 and evals.quantile(0.99) <= 10 and evals.max() <= 12, (
        float(evals.mean()),
        float(evals.quantile(0.99)),
        float(evals.max()),
    )


def test_unconverged_float32_elements_are_redone_in_float64():
    y, params = _mixture(500, 32, dtype=torch.float32)
    x_hat, info = solve_mixlogistic_inv_cdf(y, *params, max_iters=3)  # too few for some in float32
    assert x_hat.dtype == torch.float32
    assert 0 < info.num_redone_in_float64 < 500
    assert int(info.evaluations.max()) > 3  # the float64 pass went on from the float32 answer
    assert torch.isfinite(x_hat).all()
    _, info64 = solve_mixlogistic_inv_cdf(y.double(), *(p.double() for p in params), max_iters=3)
    assert info64.num_redone_in_float64 == 0
