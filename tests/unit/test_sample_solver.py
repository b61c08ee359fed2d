"""Sampling with the Newton inverse CDF agrees with the float64 bisection it replaced."""

import pytest
import torch

import flowpp.layers.coupling
from flowpp import build_model, get_preset
from flowpp.distributed import data_dependent_init
from flowpp.logistic import _inv_cdf_bisect

pytestmark = pytest.mark.unit

N = 8


@pytest.fixture(scope="module")
def model():
    """The debug preset in float32 after data-dependent init, every flow parameter nudged off
    its init so that the coupling mixtures are not all alike."""
    torch.manual_seed(0)
    cfg = get_preset("debug")
    model = build_model(cfg)
    data_dependent_init(model, torch.randint(0, cfg.num_levels, (8, *cfg.shape), dtype=torch.int64))
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def _latents(model):
    return torch.randn((N, *model.latent_shape), generator=torch.Generator().manual_seed(0))


def _with_bisection(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(flowpp.layers.coupling, "mixlogistic_inv_cdf", _inv_cdf_bisect)
        return fn()


@torch.no_grad()
def test_flow_inverse_matches_the_bisection_reference(model, monkeypatch):
    z = _latents(model)
    y = model.flow.inverse(z)
    y_ref = _with_bisection(monkeypatch, lambda: model.flow.inverse(z))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    # y lies in [0, 256): a few float32 ulps there, through every layer of the flow
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-3)
    assert (y - y_ref).abs().median() < 1e-4


@torch.no_grad()
def test_samples_match_the_bisection_reference(model, monkeypatch):
    images = model.sample(N, generator=torch.Generator().manual_seed(0))
    images_ref = _with_bisection(monkeypatch, lambda: model.sample(N, generator=torch.Generator().manual_seed(0)))
    assert images.dtype == torch.uint8 and images.shape == images_ref.shape
    # floor() may flip where the continuous value sits within float32 noise of an integer
    assert (images != images_ref).float().mean() <= 1e-3
    assert (images.int() - images_ref.int()).abs().max() <= 1


@torch.no_grad()
def test_flow_round_trip_through_the_new_inverse(model, monkeypatch):
    z = _latents(model)
    err = (model.flow(model.flow.inverse(z))[0] - z).abs()
    err_ref = _with_bisection(monkeypatch, lambda: (model.flow(model.flow.inverse(z))[0] - z).abs())
    assert torch.isfinite(err).all()
    # as close as float32 sampling got before: the inverse adds no error of its own
    assert err.max() <= 2 * err_ref.max() + 1e-5 and err.max() < 1e-3
    assert err.median() <= 1e-6
