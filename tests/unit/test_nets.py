import pytest
import torch
import torch.nn.functional as F

from flowpp.nets import Conv2d, _ConcatELUConv, concat_elu

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kernel,p", [(3, 0.0), (1, 0.3)])
def test_fused_concat_elu_conv_matches_the_unfused_ops(kernel, p):
    torch.manual_seed(0)
    conv = Conv2d(10, 4, kernel, weight_norm=True).double()
    conv.initialized.fill_(True)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    fused = conv.forward_elu(x, dropout=p)
    grads_fused = torch.autograd.grad(fused.square().sum(), [x, *conv.parameters()])
    torch.manual_seed(1)  # the same keep-mask, drawn the same way
    keep = torch.rand(2, 10, 6, 6) >= p
    e = concat_elu(x) * keep / (1 - p)
    reference = conv(e)
    grads_reference = torch.autograd.grad(reference.square().sum(), [x, *conv.parameters()])
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_fused, grads_reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_concat_elu_conv_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(1, 6, 4, 4) >= 0.25
    assert torch.autograd.gradcheck(lambda *t: _ConcatELUConv.apply(*t, 1, keep, 0.25), (x, w, b))


def test_fused_concat_elu_conv_stores_only_its_input_and_mask():
    # what makes it worth having: the doubled (B, 2C, H, W) conv input is not kept for backward
    conv = Conv2d(16, 8, 1)
    conv.initialized.fill_(True)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv.forward_elu(x, dropout=0.5)
    assert not any(t.shape == (2, 16, 16, 16) and t.is_floating_point() for t in saved)
    assert any(t.dtype == torch.bool for t in saved)


def test_eval_mode_drops_nothing():
    conv = Conv2d(6, 3, 1)
    conv.initialized.fill_(True)
    conv.eval()
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(conv.forward_elu(x, dropout=0.9), F.conv2d(concat_elu(x), conv.weight, conv.bias))
