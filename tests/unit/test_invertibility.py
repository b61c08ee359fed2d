"""One property test over every layer family, the whole flow and the dequantizer:
inverse(forward(x)) == x and logdet == slogdet of the autograd Jacobian, in float64."""

import pytest
import torch

from flowpp.layers import (
    ActNorm,
    Flip,
    LogitPreprocess,
    MixLogisticCoupling,
    Pointwise,
    SpaceToDepth,
)
from flowpp.model import FlowStep
from flowpp.presets import NetConfig
from tests.helpers import initialized_model, jacobian_logdet, random_images, tiny_config

pytestmark = pytest.mark.unit

SHAPE = (4, 4, 4)  # (C, H, W): both splits give non-trivial halves
NET = dict(hidden=8, num_blocks=1, num_heads=2)


def _coupling(split, **kw):
    return MixLogisticCoupling(SHAPE, split, num_components=3, **{**NET, **kw})


LAYERS = {
    "actnorm": lambda: ActNorm(SHAPE),
    "pointwise_stripe": lambda: Pointwise(4, "stripe"),
    "pointwise_channel": lambda: Pointwise(2, "channel"),
    "coupling_stripe_attn": lambda: _coupling("stripe"),
    "coupling_channel_attn": lambda: _coupling("channel"),
    "coupling_conv_only": lambda: _coupling("stripe", attention=False, final_concat_elu=True),
    "coupling_weight_norm": lambda: _coupling("channel", weight_norm=True),
    "flip_stripe": lambda: Flip("stripe"),
    "flip_channel": lambda: Flip("channel"),
    "space_to_depth": lambda: SpaceToDepth(),
    "flow_step_pointwise": lambda: FlowStep(
        SHAPE, "stripe", num_components=3, net=NetConfig(**NET), dropout=0.0, pointwise=True, bf16=False
    ),
}


def _check(forward, inverse, x):
    y, logdet = forward(x)
    logdet = logdet.detach()
    assert logdet.shape == (x.shape[0],)
    torch.testing.assert_close(inverse(y), x, rtol=0, atol=1e-6)
    for i in range(x.shape[0]):
        expected = jacobian_logdet(lambda v: forward(v)[0], x[i : i + 1])
        assert abs(float(logdet[i]) - float(expected)) <= 1e-6 * max(1.0, abs(expected)), (
            float(logdet[i]),
            float(expected),
        )


def _perturbed(layer, x):
    torch.manual_seed(1)
    layer = layer.double()
    layer(x)  # data-dependent init
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer.eval()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_inverse_and_logdet(name):
    torch.manual_seed(0)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    layer = _perturbed(LAYERS[name](), x)
    _check(layer, layer.inverse, x)


def test_coupling_with_context():
    torch.manual_seed(0)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    # one context for both samples, so a single-sample Jacobian sees the right one
    ctx = torch.randn(1, 5, 4, 2, dtype=torch.float64).expand(2, -1, -1, -1)
    layer = _coupling("stripe", context_channels=5).double()
    layer(x, ctx)
    layer.eval()
    _check(lambda v: layer(v, ctx[: v.shape[0]]), lambda v: layer.inverse(v, ctx[: v.shape[0]]), x)


def test_logit_preprocess():
    layer = LogitPreprocess(256)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 256
    _check(layer, layer.inverse, x)


@pytest.mark.parametrize("pointwise", [False, True])
def test_whole_flow(pointwise):
    cfg = tiny_config(pointwise=pointwise)
    model = initialized_model(cfg)
    y = random_images(2, 4, seed=3).double() + torch.rand(2, 3, 4, 4, dtype=torch.float64)
    _check(model.flow_forward, model.flow_inverse, y)


def test_dequantizer_flow_with_context():
    model = initialized_model(tiny_config())
    dq = model.dequantizer
    x = random_images(1, 4, seed=4).expand(2, -1, -1, -1)
    ctx = dq.context(x, torch.float64)
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def fwd(v):
        return dq.transform(v, ctx[: v.shape[0]])

    u, _ = fwd(eps)
    assert ((u > 0) & (u < 1)).all()
    _check(fwd, lambda v: dq.inverse_transform(v, ctx[: v.shape[0]]), eps)


def test_memory_lean_activations_have_exact_gradients():
    from flowpp.nets import concat_elu, gated_residual

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(concat_elu, (x,))
    assert torch.autograd.gradcheck(gated_residual, (x, h))
    ref = torch.nn.functional.elu(torch.cat([x, -x], 1))
    torch.testing.assert_close(concat_elu(x), ref)
