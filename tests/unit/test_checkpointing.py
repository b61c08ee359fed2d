import pytest
import torch

from flowpp import FlowPlusPlus, build_model
from flowpp.activation_checkpointing import apply_checkpointing
from flowpp.nets import CouplingBlock, GatedAttention
from tests.helpers import random_images, tiny_config

pytestmark = pytest.mark.unit


def _grads(mode, dropout):
    cfg = tiny_config(image_size=8, dropout=dropout, checkpoint=mode)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    x = random_images(4, 8)
    torch.manual_seed(1)
    model(x)  # data-dependent init
    model.train()
    torch.manual_seed(2)  # same dequantization noise and dropout masks in every mode
    model.bits_per_dim(x).mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("mode", ["attention", "all"])
def test_gradients_identical_with_and_without_checkpointing(mode, dropout):
    reference = _grads("none", dropout)
    checkpointed = _grads(mode, dropout)
    assert reference.keys() == checkpointed.keys()
    for k in reference:
        torch.testing.assert_close(checkpointed[k], reference[k], rtol=1e-10, atol=1e-12, msg=k)


def test_dropout_actually_changes_the_gradients():
    # guards the test above: with dropout on, a different RNG stream gives other grads
    a = _grads("none", 0.2)
    torch.manual_seed(99)
    cfg = tiny_config(image_size=8, dropout=0.2)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    x = random_images(4, 8)
    torch.manual_seed(1)
    model(x)
    torch.manual_seed(3)
    model.bits_per_dim(x).mean().backward()
    diffs = [not torch.allclose(p.grad, a[k]) for k, p in model.named_parameters() if p.grad is not None]
    assert any(diffs)


@pytest.mark.parametrize("mode,method", [("attention", "attend"), ("all", "forward")])
def test_wraps_the_right_modules_and_keeps_state_dict_keys(mode, method):
    cfg = tiny_config(image_size=8)
    plain = FlowPlusPlus(cfg)
    wrapped = FlowPlusPlus(cfg)
    count = apply_checkpointing(wrapped, mode)
    blocks = [m for m in wrapped.modules() if isinstance(m, CouplingBlock)]
    targets = [b for b in blocks if mode == "all" or isinstance(b.attn, GatedAttention)]
    assert count == len(targets) > 0
    # the attention block is gated attention plus its layer norm; conv sub-blocks stay stored
    assert all(method in vars(b) for b in targets)
    assert mode == "all" or not any("attend" in vars(b) or "forward" in vars(b) for b in blocks if b.attn is None)
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    wrapped.load_state_dict(plain.state_dict())


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="sometimes"):
        apply_checkpointing(FlowPlusPlus(tiny_config()), "sometimes")
