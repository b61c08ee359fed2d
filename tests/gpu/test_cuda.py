"""The model's CUDA paths, with torch alone: bf16 on the imagenet64 preset, evaluation,
sampling and the data path on the device. Skipped without CUDA (tests/conftest.py);
``python3 -m bench.gpu_tests`` runs them on a GPU machine,
each file in its own pytest process."""

from __future__ import annotations

import math

import pytest
import torch

from flowpp import build_model, get_preset
from flowpp.distributed import data_dependent_init
from flowpp.ema import EMA
from orchestrator.cli import smooth_images
from orchestrator.data.stream import to_device
from orchestrator.evaluation.evaluate import evaluate
from orchestrator.evaluation.images import sample_grid
from orchestrator.training.step import all_sum, train_step

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def debug_model():
    torch.manual_seed(0)
    model = build_model(get_preset("debug")).to(CUDA)
    data_dependent_init(model, smooth_images(16, 16).to(torch.uint8).to(CUDA))
    return model


def test_bf16_autocast_stays_finite_on_the_imagenet64_preset_at_batch_9():
    torch.manual_seed(0)
    model = build_model(get_preset("imagenet64", bf16=True, checkpoint="attention")).to(CUDA)
    x = to_device(smooth_images(9, 64).to(torch.uint8).pin_memory(), CUDA)
    data_dependent_init(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(3):
        out = train_step(model, opt, x, lr=1e-4, grad_clip=1.0)
        assert not out.skipped and math.isfinite(out.loss) and math.isfinite(out.grad_norm), out
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay float32


def test_a_train_step_ema_and_all_sum_stay_on_the_device():
    model = debug_model()
    ema = EMA(model, 0.9)
    assert {t.device.type for t in ema.shadow.values()} == {"cuda"}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = to_device(smooth_images(8, 16).to(torch.uint8), CUDA)
    out = train_step(model, opt, x, lr=1e-3, grad_clip=1.0)
    assert not out.skipped
    ema.update(model)
    state = {k: v.cpu() for k, v in ema.state_dict()["shadow"].items()}  # as a checkpoint reads it
    ema.load_state_dict({"decay": 0.9, "num_updates": 1, "shadow": state})
    assert {t.device.type for t in ema.shadow.values()} == {"cuda"}
    assert all_sum(torch.ones(2, device=CUDA)) == [1.0, 1.0]


def test_evaluation_and_sampling_on_cuda_are_seeded_and_leave_the_rng_alone():
    model = debug_model()
    batches = [smooth_images(4, 16, seed=s).to(torch.uint8) for s in (1, 2)]  # on the CPU, as a stream gives them
    cuda_rng = torch.cuda.get_rng_state()
    bpd, count = evaluate(model, batches, samples=2, seed=3)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert count == 8 and math.isfinite(bpd) and evaluate(model, batches, samples=2, seed=3)[0] == bpd


def test_sample_grid_draws_on_the_model_device_and_is_reproducible(tmp_path):
    model = debug_model().eval()
    a = sample_grid(model, 4, tmp_path / "a.png", seed=5)
    b = sample_grid(model, 4, tmp_path / "b.png", seed=5)
    assert a.read_bytes() == b.read_bytes()


def test_5_bit_pixels_reach_the_device_reduced():
    images = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8).pin_memory()
    x = to_device(images, CUDA, 5)
    assert x.device.type == "cuda" and x.dtype == torch.uint8 and int(x.max()) == 31


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_bf16_channels_last_fused_step_matches_eager_on_cuda(mode):
    """The speed options together on the device: the compiled step's loss tracks eager's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = get_preset("debug", bf16=True, checkpoint="attention", channels_last=True)
    x = to_device(smooth_images(8, 16).to(torch.uint8).pin_memory(), CUDA)
    torch.manual_seed(0)
    eager = build_model(cfg).to(CUDA)
    data_dependent_init(eager, x)
    fast = build_model(cfg.replace(compile=True, compile_mode=mode)).to(CUDA)
    fast.load_state_dict(eager.state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4, fused=True) for m in (eager, fast)]
    losses = []
    for model, opt in zip((eager, fast), opts, strict=True):
        torch.manual_seed(1)
        losses.append([train_step(model, opt, x, lr=1e-4, grad_clip=1.0).loss for _ in range(3)])
    assert dict(counters["graph_break"]) == {}
    assert all(math.isfinite(v) for v in losses[1])
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)  # bf16 nets: kernels may round differently
    torch._dynamo.reset()


def test_a_training_step_syncs_once_and_a_5_bit_forward_never():
    """torch's sync debug mode warns at each host sync: the step's one read of loss, gradient norm and
    finite flag, and nothing else (no per-layer init flag, no per-forward pixel-range check)."""
    import warnings

    torch.manual_seed(0)
    cfg = get_preset("debug").replace(num_bits=5)
    model = build_model(cfg).to(CUDA)
    x = (smooth_images(8, 16).to(CUDA) >> 3).long()  # int64 5-bit pixels: a range check is due
    data_dependent_init(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    train_step(model, opt, x, lr=1e-4, grad_clip=1.0)  # Adam's state
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                model(x)
            forward_syncs = sum("synchroniz" in str(w.message) for w in caught)
            out = train_step(model, opt, x, lr=1e-4, grad_clip=1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    step_syncs = sum("synchroniz" in str(w.message) for w in caught) - forward_syncs
    assert forward_syncs == 0 and step_syncs == 1, [str(w.message)[:120] for w in caught]
    assert not out.skipped and math.isfinite(out.loss)
    # (an out-of-range batch fails the device-side assert, which ends the process's CUDA context:
    # not tried here, where the file's other tests share that context)
