import pytest
import torch
from torch import nn

from flowpp.ema import EMA
from tests.helpers import initialized_model, random_images, tiny_config

pytestmark = pytest.mark.unit


def test_ema_follows_the_polyak_recursion():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * start + 0.1 * (start + 1.0)
    torch.testing.assert_close(ema.shadow["weight"], expected)


def test_average_parameters_swaps_in_and_restores():
    model = initialized_model(tiny_config()).float()
    ema = EMA(model, decay=0.5)
    trained = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ema.update(model)
    x = random_images(2, 4)
    with ema.average_parameters(model):
        for k, p in model.named_parameters():
            torch.testing.assert_close(p, trained[k] + 0.05)
        assert torch.isfinite(model.bits_per_dim(x)).all()
        assert model.sample(2).dtype == torch.uint8
    for k, p in model.named_parameters():
        torch.testing.assert_close(p, trained[k] + 0.1)


def test_state_dict_round_trip_and_mismatch_error():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    ema.update(model)
    other = EMA(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99 and other.num_updates == 1
    with pytest.raises(KeyError, match="differing keys"):
        EMA(nn.Linear(3, 2, bias=False)).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
