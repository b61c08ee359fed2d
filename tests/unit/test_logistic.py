import pytest
import torch

from flowpp.logistic import (
    MIN_LOG_SCALE,
    mixlogistic_inv_cdf,
    mixlogistic_log_cdf,
    mixlogistic_log_pdf,
    mixlogistic_log_sf,
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
    # The root is bracketed to tol. x itself is the root only up to the float64 rounding
    # of y (~1e-16), which moves it by ~1e-16 / pdf(x) where the CDF is flat.
    pdf = mixlogistic_log_pdf(x[keep], *(p[keep] for p in params)).exp()
    allowed = tol + 1e-14 / pdf
    assert ((x_hat - x[keep]).abs() <= allowed).all()
    assert (x_hat - x[keep]).abs().median() < 1e-9


def test_inverse_cdf_extreme_y_is_clamped_and_finite():
    params = _params((6,), 4)
    y = torch.tensor([0.0, 1e-12, 1e-5, 0.5, 1 - 1e-12, 1.0], dtype=torch.float64)
    x = mixlogistic_inv_cdf(y, *params)
    assert torch.isfinite(x).all()
    y_back = mixlogistic_log_cdf(x, *params).exp()
    torch.testing.assert_close(y_back, y.clamp(1e-5, 1 - 1e-5), rtol=1e-6, atol=1e-9)


def test_inverse_cdf_respects_iteration_cap():
    params = _params((10,), 3)
    y = torch.rand(10, dtype=torch.float64)
    rough = mixlogistic_inv_cdf(y, *params, max_iters=3)
    fine = mixlogistic_inv_cdf(y, *params)
    assert (rough - fine).abs().max() > 1e-6  # 3 halvings cannot converge
    assert torch.isfinite(rough).all()
