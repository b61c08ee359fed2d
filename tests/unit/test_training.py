import pytest
import torch

from flowpp import FlowPlusPlus, get_preset
from flowpp.distributed import data_dependent_init
from orchestrator.cli import smooth_images

pytestmark = pytest.mark.unit


def _seeded_loss(model, x, seed=123):
    torch.manual_seed(seed)  # same dequantization noise before and after
    return model.bits_per_dim(x).mean()


def _model_and_batch(n=16):
    torch.manual_seed(0)
    model = FlowPlusPlus(get_preset("debug"))
    x = smooth_images(n, 16, seed=1)
    data_dependent_init(model, x)
    return model, x


def test_one_step_lowers_the_loss():
    model, x = _model_and_batch(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = _seeded_loss(model, x)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = _seeded_loss(model, x)
    assert after < before


def test_200_steps_on_a_fixed_batch_cut_bits_per_dim_by_30_percent():
    model, x = _model_and_batch(16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        start = _seeded_loss(model, x).item()
    for _ in range(200):
        loss = model.bits_per_dim(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        end = _seeded_loss(model, x).item()
    assert end <= 0.7 * start, (start, end)
