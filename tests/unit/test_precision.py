import pytest
import torch

from flowpp import FlowPlusPlus
from flowpp.distributed import data_dependent_init
from flowpp.layers import MixLogisticCoupling
from tests.helpers import random_images, tiny_config

pytestmark = pytest.mark.unit


def _pair():
    cfg = tiny_config(image_size=8)
    torch.manual_seed(0)
    fp32 = FlowPlusPlus(cfg)
    bf16 = FlowPlusPlus(cfg.replace(bf16=True))
    x = random_images(4, 8)
    data_dependent_init(fp32, x)
    bf16.load_state_dict(fp32.state_dict())
    return fp32, bf16, x


def test_bf16_coupling_nets_run_and_stay_finite_on_cpu():
    fp32, bf16, x = _pair()
    torch.manual_seed(1)
    ref = fp32.bits_per_dim(x)
    torch.manual_seed(1)
    low = bf16.bits_per_dim(x)
    assert low.dtype == torch.float32
    assert torch.isfinite(low).all()
    low.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in bf16.parameters() if p.grad is not None)
    assert (low - ref).abs().max() < 0.05  # bf16 nets, float32 mixture maths
    assert not torch.equal(low, ref)  # the option really did something


def test_mixture_maths_and_logdet_stay_float32_under_bf16():
    _, bf16, x = _pair()
    coupling = next(m for m in bf16.flow.modules() if isinstance(m, MixLogisticCoupling))
    seen = {}

    def record(module, inputs, output):
        seen["net"] = output.dtype

    coupling.net.register_forward_hook(record)
    h = torch.randn(2, 3, 8, 8)
    y, logdet = coupling(h)
    assert seen["net"] == torch.bfloat16  # the net really ran in bf16
    assert y.dtype == logdet.dtype == torch.float32
    a, shift, mix = coupling._params(h[:, :, :, 0::2], None)
    assert all(t.dtype == torch.float32 for t in (a, shift, *mix))
