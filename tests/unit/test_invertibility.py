"""One property test over every layer family, the whole flow and the dequantizer:
inverse(forward(x)) == x and logdet == slogdet of the autograd Jacobian, in float64."""

import dataclasses

import pytest
import torch

from flowpp.layers import (
    ActNorm,
    Flip,
    InvertibleSequential,
    LogitPreprocess,
    MixLogisticCoupling,
    Pointwise,
    SpaceToDepth,
)
from flowpp.model import FlowStep
from flowpp.presets import FlowConfig, NetConfig
from tests.helpers import initialized_model, jacobian_logdet, random_images, tiny_config

pytestmark = pytest.mark.unit

SHAPE = (4, 4, 4)  # (C, H, W): both splits give non-trivial halves
NET = NetConfig(hidden=8, num_blocks=1, num_heads=2)


def _coupling(split, context_channels=0, **net):
    return MixLogisticCoupling(
        SHAPE, split, num_components=3, net=dataclasses.replace(NET, **net), context_channels=context_channels
    )


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
    "flow_step_pointwise": lambda: FlowStep(SHAPE, "stripe", FlowConfig(num_components=3, pointwise=True), NET),
    "sequential": lambda: InvertibleSequential([ActNorm(SHAPE), _coupling("channel"), Flip("stripe"), SpaceToDepth()]),
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
    _check(model.flow, model.flow.inverse, y)


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
    from flowpp.ops import concat_elu, gated_residual

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(concat_elu, (x,))
    assert torch.autograd.gradcheck(gated_residual, (x, h))
    ref = torch.nn.functional.elu(torch.cat([x, -x], 1))
    torch.testing.assert_close(concat_elu(x), ref)


def test_sequential_sums_logdets_and_inverts_in_reverse():
    torch.manual_seed(0)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    layers = [_perturbed(ActNorm(SHAPE), x), Pointwise(2, "channel").double(), SpaceToDepth()]
    chain = InvertibleSequential(layers)
    y, logdet = chain(x)
    h, expected = x, torch.zeros(2, dtype=torch.float64)
    for layer in layers:
        h, ld = layer(h)
        expected = expected + ld
    torch.testing.assert_close(y, h, rtol=0, atol=0)
    torch.testing.assert_close(logdet, expected, rtol=0, atol=0)
    assert [name for name, _ in chain.named_children()] == ["0", "1", "2"]
    assert InvertibleSequential()(x)[1].equal(x.new_zeros(2))  # empty chain: identity, logdet 0
    torch.testing.assert_close(chain.inverse(y), x, rtol=0, atol=1e-12)
