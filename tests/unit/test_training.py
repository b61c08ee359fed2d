import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flowpp import FlowPlusPlus, get_preset
from flowpp.distributed import data_dependent_init
from orchestrator.cli import smooth_images
from orchestrator.training.loop import lr_at, train_step

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


@pytest.mark.slow
def test_200_steps_on_a_fixed_batch_cut_bits_per_dim_by_30_percent():
    model, x = _model_and_batch(16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        start = _seeded_loss(model, x).item()
    for _ in range(200):
        assert not train_step(model, opt, x, lr=2e-3, grad_clip=1.0).skipped
    with torch.no_grad():
        end = _seeded_loss(model, x).item()
    assert end <= 0.7 * start, (start, end)


def test_train_step_reports_bits_per_dim_and_clips_the_gradient():
    model, x = _model_and_batch(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = model.bits_per_dim(x).mean().item()
    torch.manual_seed(5)  # the same dequantization noise
    out = train_step(model, opt, x, lr=1e-3, grad_clip=1e-3)
    assert not out.skipped and out.grad_norm > 1e-3  # the norm before clipping
    assert abs(out.loss - expected) < 1e-4
    assert opt.param_groups[0]["lr"] == 1e-3


def test_micro_batches_add_up_to_the_whole_batchs_step():
    """8 images as micro-batches of 3, 3 and 2: the same loss, gradient norm and update as one batch
    (each part's loss weighted by its share; the dequantization noise is drawn in the same order)."""
    import copy

    model, x = _model_and_batch(8)
    whole, parts = copy.deepcopy(model), copy.deepcopy(model)
    runs = []
    for m, micro in ((whole, 0), (parts, 3)):
        torch.manual_seed(5)
        runs.append(train_step(m, torch.optim.Adam(m.parameters(), lr=1e-3), x, lr=1e-3, grad_clip=1e-3, micro=micro))
    assert abs(runs[0].loss - runs[1].loss) < 1e-5 and runs[0].grad_norm == pytest.approx(runs[1].grad_norm, rel=1e-5)
    for p, q in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), parts.parameters(), strict=True))


def test_a_non_finite_loss_skips_the_step_and_leaves_the_weights():
    model, x = _model_and_batch(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_step(model, opt, x, lr=1e-3, grad_clip=1.0)
    assert out.skipped
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True)
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state  # Adam took no step


def test_lr_warms_up_linearly_then_holds():
    from orchestrator.config import TrainSpec

    train = TrainSpec(lr=4e-4, warmup_steps=4, max_steps=10)
    assert [lr_at(s, train) for s in range(6)] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 4e-4, 4e-4])
    assert lr_at(0, TrainSpec(lr=1e-3, warmup_steps=0)) == 1e-3


class _Reads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (``.item()``, ``bool``, ``float``)."""

    def __init__(self):
        super().__init__()
        self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.scalar_reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_train_step_reads_from_the_device_once(monkeypatch):
    """Every value the step needs on the host comes in one copy. ``tolist`` is not a dispatched op,
    so its calls are counted by wrapping it (it still runs); every other read is a scalar op."""
    model, x = _model_and_batch(4)
    x = x.to(torch.uint8)  # as the data stream hands 8-bit pixels to the step
    # fused, as jobs/imagenet64.yaml runs it: unfused Adam reads its step counters (host tensors) per parameter
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    train_step(model, opt, x, lr=1e-3, grad_clip=1.0)  # Adam's state exists
    tolist_calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(t.shape) or tolist(t))
    with _Reads() as reads:
        out = train_step(model, opt, x, lr=1e-3, grad_clip=1.0)
    assert not out.skipped and out.loss > 0 and out.grad_norm > 0
    assert reads.scalar_reads == 0
    assert tolist_calls == [torch.Size([3])]
