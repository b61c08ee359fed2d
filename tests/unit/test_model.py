import math

import pytest
import torch

from flowpp import FlowPlusPlus, get_preset
from flowpp.distributed import data_dependent_init
from orchestrator.cli import smooth_images
from tests.helpers import initialized_model, random_images, tiny_config

pytestmark = pytest.mark.unit


def test_untrained_bits_per_dim_is_finite_on_random_bytes():
    torch.manual_seed(0)
    model = FlowPlusPlus(get_preset("debug"))
    x = random_images(8, 16)
    data_dependent_init(model, x)
    bpd = model.bits_per_dim(x)
    assert bpd.shape == (8,)
    assert torch.isfinite(bpd).all()
    assert 4.0 < bpd.mean() < 20.0  # an untrained flow is in the vicinity of 8 bits


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["variational", "uniform"])
def test_constant_images_never_go_below_zero_bits(kind):
    """P(x) <= 1 for discrete x, so the bound is never negative, even when the model
    is pushed hard towards a single constant image."""
    torch.manual_seed(0)
    cfg = get_preset("debug").replace(image_size=8)
    cfg = cfg.replace(dequant=cfg.dequant.__class__(**{**cfg.dequant.__dict__, "kind": kind}))
    model = FlowPlusPlus(cfg)
    x = torch.full((8, 3, 8, 8), 128, dtype=torch.int64)
    data_dependent_init(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    seen = []
    for _ in range(60):
        bpd = model.bits_per_dim(x)
        seen.append(bpd.detach())
        opt.zero_grad()
        bpd.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seen = torch.stack(seen)
    assert seen[-1].mean() < 1.0  # close to the floor: the bound is under real pressure
    with torch.no_grad():
        seen = torch.cat([seen.flatten(), model.eval().bits_per_dim(x)])
    assert (seen >= 0).all(), float(seen.min())


def test_5bit_and_8bit_densities_agree_on_their_scales():
    """With the same weights, a 5-bit model's density of y in [0, 32) is 8^D times the
    8-bit model's density of 8y in [0, 256): bits/dim differ by exactly 3."""
    cfg8 = tiny_config(image_size=4)
    model8 = initialized_model(cfg8)
    model5 = FlowPlusPlus(cfg8.replace(num_bits=5)).double()
    model5.load_state_dict(model8.state_dict())
    model5.eval()
    y5 = random_images(4, 4, num_levels=32).double() + torch.rand(4, 3, 4, 4, dtype=torch.float64)
    d = 48 * math.log(2)
    bpd5 = -model5.log_density(y5) / d
    bpd8 = -model8.log_density(8 * y5) / d
    torch.testing.assert_close(bpd8 - bpd5, torch.full_like(bpd5, 3.0), rtol=0, atol=1e-9)


def test_5bit_model_scores_and_samples_on_its_own_scale():
    torch.manual_seed(0)
    model = FlowPlusPlus(get_preset("imagenet64_5bit").__class__(**{**tiny_config().__dict__, "num_bits": 5}))
    x = random_images(4, 4, num_levels=32)
    data_dependent_init(model, x)
    assert model.num_levels == 32
    assert torch.isfinite(model.bits_per_dim(x)).all()
    samples = model.eval().sample(3)
    assert samples.dtype == torch.uint8 and int(samples.max()) <= 31


def test_importance_weighted_bound_is_tighter_than_the_elbo():
    model = initialized_model(tiny_config())
    x = random_images(4, 4, seed=1)
    torch.manual_seed(5)
    elbo = torch.stack([model.log_prob(x) for _ in range(16)]).detach()
    torch.manual_seed(5)
    iw = model.importance_weighted_log_prob(x, num_samples=16)
    # same 16 dequantization samples: log-mean-exp >= mean (Jensen), per image
    assert (iw >= elbo.mean(0) - 1e-9).all()
    torch.testing.assert_close(iw, torch.logsumexp(elbo, 0) - math.log(16))


def test_sample_returns_uint8_images_and_is_seeded():
    model = initialized_model(tiny_config(image_size=8)).float()
    a = model.sample(5, generator=torch.Generator().manual_seed(0))
    b = model.sample(5, generator=torch.Generator().manual_seed(0))
    cold = model.sample(5, temperature=0.0)
    assert a.shape == (5, 3, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert torch.equal(cold[0], cold[1])  # temperature 0 is the mode of the prior


def test_log_prob_is_the_elbo_of_its_parts():
    model = initialized_model(tiny_config())
    x = random_images(3, 4, seed=2)
    torch.manual_seed(3)
    lp = model.log_prob(x)
    torch.manual_seed(3)
    u, log_q = model.dequantizer(x, dtype=torch.float64)
    assert ((u >= 0) & (u < 1)).all()
    torch.testing.assert_close(lp, model.log_density(x.double() + u) - log_q)


def test_smooth_images_fixture_is_structured():
    x = smooth_images(4, 16)
    assert x.shape == (4, 3, 16, 16) and x.min() >= 0 and x.max() <= 255


@pytest.mark.parametrize("kind", ["variational", "uniform"])
def test_given_noise_fixes_each_images_bound_whatever_the_batch_it_is_in(kind):
    """What a resize rests on: an image's bound depends on its own noise alone, so the same noise
    gives the same figure in a batch of 8 or in its half; each dequantizer draws the noise it takes."""
    cfg = tiny_config(image_size=8)
    cfg = cfg.replace(dequant=cfg.dequant.__class__(**{**cfg.dequant.__dict__, "kind": kind}))
    model = initialized_model(cfg).eval()
    x = random_images(8, 8, seed=1)
    draw = lambda seed: model.dequantizer.draw(
        x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )  # noqa: E731
    noise = draw(7)
    assert (noise.min() < 0) == (kind == "variational") and torch.equal(draw(7), noise)
    with torch.no_grad():
        whole = model.log_prob(x, noise)
        torch.testing.assert_close(model.log_prob(x[4:], noise[4:]), whole[4:], rtol=1e-9, atol=1e-9)
        assert not torch.allclose(model.log_prob(x, draw(8)), whole)  # other noise, other bound
