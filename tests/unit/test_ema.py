import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flowpp import FlowPlusPlus
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


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_and_copy_are_a_few_foreach_ops_whatever_the_parameter_count(dtype):
    model = FlowPlusPlus(tiny_config()).to(dtype)
    assert len(list(model.parameters())) > 100
    ema = EMA(model, decay=0.5)
    ema.update(model)  # the first allocates a low-precision model's float32 staging copy; shadow unchanged
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    expected = {
        k: 0.5 * v + 0.5 * p.detach().float() for (k, v), p in zip(ema.shadow.items(), model.parameters(), strict=True)
    }
    with _Ops() as update:
        ema.update(model)
    with _Ops() as copy:
        ema.copy_to(model)
    assert len(update.names) == (1 if dtype == torch.float32 else 2), update.names[:20]  # the goal: <= 16
    assert len(copy.names) == 1, copy.names
    for k, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[k], expected[k], msg=k)
        torch.testing.assert_close(p, expected[k].to(dtype), msg=k)
