import pytest
import torch
import torch.nn.functional as F

from flowpp.nets import Conv2d
from flowpp.ops import _ConcatELUConv, concat_elu, gated_residual

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kernel,p", [(3, 0.0), (1, 0.3)])
def test_fused_concat_elu_conv_matches_the_unfused_ops(kernel, p, gated):
    torch.manual_seed(0)
    conv = Conv2d(10, 4, kernel, weight_norm=True).double()
    conv.initialized.fill_(True)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True) if gated else None
    inputs = [x, *conv.parameters()] + ([r] if gated else [])
    torch.manual_seed(1)
    fused = conv.forward_elu(x, dropout=p, residual=r)
    grads_fused = torch.autograd.grad(fused.square().sum(), inputs)
    torch.manual_seed(1)  # the same keep-mask, drawn the same way
    keep = torch.rand(2, 10, 6, 6) >= p
    e = concat_elu(x) * keep / (1 - p)
    reference = gated_residual(r, conv(e)) if gated else conv(e)
    grads_reference = torch.autograd.grad(reference.square().sum(), inputs)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_fused, grads_reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_concat_elu_conv_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(1, 6, 4, 4) >= 0.25
    assert torch.autograd.gradcheck(lambda x, w, b: _ConcatELUConv.apply(x, w, b, 1, keep, 0.25), (x, w, b))
    gated = lambda x, w, b, r: _ConcatELUConv.apply(x, w, b, 1, keep, 0.25, r)  # noqa: E731
    assert torch.autograd.gradcheck(gated, (x, w, b, r))


def test_fused_concat_elu_conv_stores_only_its_input_and_mask():
    # what makes it worth having: the doubled (B, 2C, H, W) conv input is not kept for backward
    conv = Conv2d(16, 6, 1)
    conv.initialized.fill_(True)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv.forward_elu(x, dropout=0.5, residual=torch.randn(2, 3, 16, 16))
    # neither the doubled input nor the (B, 2C', H, W) gate pre-activation
    assert not any(t.shape[:2] in ((2, 16), (2, 6)) and t.is_floating_point() for t in saved)
    assert any(t.dtype == torch.bool for t in saved)


def test_eval_mode_drops_nothing():
    conv = Conv2d(6, 3, 1)
    conv.initialized.fill_(True)
    conv.eval()
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(conv.forward_elu(x, dropout=0.9), F.conv2d(concat_elu(x), conv.weight, conv.bias))
