"""The figures of the training log line: model FLOPs, peak FLOP/s and MFU, the loader's share, the ETA."""

from __future__ import annotations

import contextlib
import dataclasses
import re

import pytest
import torch

from flowpp import get_preset
from flowpp.flops import flop_counter, train_flops_per_image
from flowpp.ops import concat_elu_conv, plain_autograd
from orchestrator.training.meter import Meter, eta_text
from orchestrator.training.mfu import PEAK_ENV, device_peak_flops, mfu, peak_flops
from orchestrator.training.step import StepResult

pytestmark = pytest.mark.unit


def test_training_flops_count_the_model_once_whatever_the_checkpoint_mode_and_leave_the_rng_alone():
    cfg = get_preset("debug")
    torch.manual_seed(3)
    before = torch.get_rng_state()
    plain = train_flops_per_image(cfg)
    assert torch.equal(torch.get_rng_state(), before)  # a resumed run draws what an uninterrupted one would
    # checkpointing recomputes forwards, which MFU does not count
    assert train_flops_per_image(cfg.replace(checkpoint="attention")) == plain
    # a wider coupling net costs more
    wider = cfg.replace(net=dataclasses.replace(cfg.net, hidden=cfg.net.hidden * 4))
    assert train_flops_per_image(wider) > 1.5 * plain
    assert plain > 1e6


def _gated_conv_flops(plain: bool) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of one gated conv: (1, 8, 6, 6) -> (1, 4, 6, 6)."""
    torch.manual_seed(0)
    x, residual = torch.randn(1, 8, 6, 6, requires_grad=True), torch.randn(1, 4, 6, 6)
    weight, bias = torch.randn(8, 16, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)
    with flop_counter() as forward:
        concat_elu_conv(x, weight, bias, 1, residual=residual)
    counter = flop_counter()
    with counter, plain_autograd() if plain else contextlib.nullcontext():
        out = concat_elu_conv(x, weight, bias, 1, residual=residual)
        out.sum().backward()
    return forward.get_total_flops(), counter.get_total_flops()


def test_model_flops_leave_out_the_gated_convs_backward_recompute():
    conv, lean = _gated_conv_flops(plain=False)
    _, plain = _gated_conv_flops(plain=True)
    assert conv == 2 * 8 * 16 * 9 * 36  # multiply-adds of a 3x3 conv, 16 -> 8 channels on 6x6
    assert lean == 4 * conv  # forward, the recomputed forward, input and weight gradients
    assert plain == 3 * conv  # the model's work: forward, input and weight gradients


@pytest.mark.parametrize(
    ("name", "tflops"),
    [("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 NVL", 835),
     ("NVIDIA H100 PCIe", 756), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312),
     ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA H200 MIG 1g.18gb", None), ("NVIDIA GeForce RTX 4090", None)],
)  # fmt: skip
def test_peak_table_covers_the_sxm_pcie_and_nvl_parts(name, tflops):
    assert peak_flops(name) == (tflops and tflops * 1e12)


def test_peak_flops_by_override_then_environment_then_gpu_name(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert device_peak_flops(cpu) is None  # no MFU on a CPU by default
    monkeypatch.setenv(PEAK_ENV, "2.5")
    assert device_peak_flops(cpu) == 2.5e12
    assert device_peak_flops(cpu, override_tflops=100.0) == 100e12  # scaling.peak_tflops wins
    assert mfu(1e9, 1000.0, 1e13) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "00:00:00"),
        (3661, "01:01:01"),
        (86399, "23:59:59"),
        (86400, "1.0 days"),
        (4.3 * 86400, "4.3 days"),
        (float("inf"), "?"),
    ],  # fmt: skip
)
def test_eta_is_in_days_from_24_hours_on(seconds, text):
    assert eta_text(seconds) == text


def test_the_log_line_holds_rate_mfu_world_loader_wait_substituted_and_eta():
    meter = Meter(step=0, world=2, device=torch.device("cpu"), usage=(1e9, 1e12), accum=3)
    meter.since -= 2.0  # two seconds of steps since the last line
    meter.started -= 2.0
    for _ in range(4):
        meter.add(StepResult(loss=4.0, grad_norm=0.5, skipped=False))
    meter.images = 400  # both ranks: 200 images a second
    meter.data_wait = 0.5  # this rank waited half a second for its batches (one rank: the sum is itself)
    metrics = meter.flush(1e-3, {"nonfinite_skipped": 0}, substituted=3)
    assert metrics["images_per_s"] == pytest.approx(200, rel=0.01)
    assert metrics["data_wait_pct"] == pytest.approx(100 * 0.5 / (2 * 2.0), rel=0.01)
    assert metrics["mfu_pct"] == pytest.approx(100 * 1e9 * 100 / 1e12, rel=0.01)  # per worker: 100 images/s
    assert metrics["substituted_samples"] == 3
    assert (metrics["world_size"], metrics["accum_steps"]) == (2, 3)  # to MLflow with the rest
    assert "gpu_mem_peak_gib" not in metrics  # CUDA only
    line = meter.line(4, 1_000_000, metrics)
    for part in ("step 4/1000000", "bits/dim 4.0000", "lr 1.00e-03", "grad_norm 0.500", "mfu 10.0%",
                 "world 2 x accum 3", "data_wait 12.5%", "substituted 3", "days"):  # fmt: skip
        assert part in line, (part, line)
    # the rate is the flushed figure to one decimal: the clock moved on a little past the two seconds
    rate = re.search(r"images/s ([\d,.]+)", line)
    assert rate and float(rate[1].replace(",", "")) == pytest.approx(200, rel=0.01), line
    assert rate[1] == f"{metrics['images_per_s']:,.1f}", line
