"""Pixels on their way into the model (5-bit reduction, range checks), and the all-reduced
evaluation the training loop runs (one-sample and importance-weighted)."""

from __future__ import annotations

import math

import pytest
import torch

from flowpp import FlowPlusPlus
from flowpp.distributed import data_dependent_init
from flowpp.ema import EMA
from orchestrator.data.stream import to_device
from orchestrator.evaluation.evaluate import evaluate
from tests.helpers import random_images, tiny_config

pytestmark = pytest.mark.unit


def model_of(num_bits: int = 8, seed: int = 0) -> FlowPlusPlus:
    torch.manual_seed(seed)
    model = FlowPlusPlus(tiny_config(image_size=8, num_bits=num_bits))
    data_dependent_init(model, random_images(8, 8, 2**num_bits, seed))
    return model.eval()


def test_to_device_reduces_8_bit_pixels_to_num_bits_and_keeps_uint8():
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    five = to_device(images, "cpu", 5)
    assert five.dtype == torch.uint8
    assert torch.equal(five, images // 8)  # floor(x / 8), the official 5-bit launcher's input
    assert five.max() == 31 and five.min() == 0
    assert torch.equal(to_device(images, "cpu", 8), images)
    with pytest.raises(ValueError, match="num_bits must be in 1..8"):
        to_device(images, "cpu", 9)


def test_a_5_bit_model_scores_reduced_pixels_and_refuses_raw_bytes_naming_the_range():
    model = model_of(num_bits=5)
    raw = random_images(2, 8, 256, seed=3).to(torch.uint8)
    assert raw.max() >= 32
    expected = r"\[0, 32\) for a 5-bit model, got \[\d+, \d+\]; reduce 8-bit pixels with x >> 3"
    with pytest.raises(ValueError, match=expected):
        model.log_prob(raw)
    lp = model.log_prob(to_device(raw, "cpu", 5))
    assert lp.shape == (2,) and torch.isfinite(lp).all()


@pytest.mark.parametrize("bad", [-1, 256])
def test_an_8_bit_model_refuses_pixels_outside_0_255(bad):
    x = random_images(2, 8, 256)
    x[1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"must lie in \[0, 256\) for a 8-bit model"):
        model_of().log_prob(x)


def test_float_pixels_are_refused():
    with pytest.raises(ValueError, match="must be integers"):
        model_of().log_prob(random_images(2, 8).float())


def test_evaluate_is_the_mean_bits_per_dim_with_seeded_noise_and_leaves_the_rng_alone():
    model = model_of()
    batches = [random_images(3, 8, seed=s).to(torch.uint8) for s in (1, 2)]
    before = torch.get_rng_state()
    bpd, count = evaluate(model, batches, samples=1, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert count == 6
    torch.manual_seed(7)
    with torch.no_grad():
        expected = torch.cat([-model.log_prob(b) for b in batches]).mean() / (model.num_dims * math.log(2))
    assert bpd == pytest.approx(float(expected), rel=1e-6)
    assert evaluate(model, batches, samples=1, seed=7)[0] == bpd  # the same noise every time


def test_the_importance_weighted_bound_is_tighter_than_the_one_sample_bound():
    model = model_of()
    batches = [random_images(4, 8, seed=s).to(torch.uint8) for s in (1, 2)]
    one = [evaluate(model, batches, samples=1, seed=s)[0] for s in range(4)]
    iw = evaluate(model, batches, samples=16, seed=0)[0]
    assert math.isfinite(iw)
    assert iw < sum(one) / len(one)  # log-mean-exp >= mean: lower bits/dim


def test_ema_state_loads_onto_the_device_and_dtype_of_the_live_shadow():
    model = model_of()
    ema = EMA(model, 0.9)
    saved = {k: v.double() for k, v in ema.state_dict()["shadow"].items()}
    ema.load_state_dict({"decay": 0.5, "num_updates": 3, "shadow": saved})
    assert ema.decay == 0.5 and ema.num_updates == 3
    for k, p in model.named_parameters():
        assert ema.shadow[k].dtype == torch.float32 and ema.shadow[k].device == p.device
        assert ema.shadow[k].data_ptr() != saved[k].data_ptr()
