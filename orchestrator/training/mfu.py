"""How much of its device a training run uses: model FLOPs per image, the device's peak, MFU.

Importable with torch alone: bench/ uses it on GPU machines that may lack the orchestrator's
other dependencies, and the trainer (orchestrator/training/loop.py) puts MFU in its log line.

MFU follows the usual definition: the model's FLOPs per training image (forward + backward, one
image, counted by torch's ``FlopCounterMode``; neither the forward that activation checkpointing
recomputes nor the gated convolution that flowpp/ops.py recomputes in backward is counted),
times images/s, over the device's dense bf16 tensor-core peak,
whatever the run's precision, so fp32 and bf16 runs compare on one scale.
"""

from __future__ import annotations

import os

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (which quote twice
# these "with sparsity"). The first row whose every part is in the device's name wins, so each
# card's variants come before its SXM row: the SXM H100 calls itself "NVIDIA H100 80GB HBM3".
# The A100's PCIe card has the SXM card's tensor-core peak; the H100 and H200 PCIe/NVL cards run
# lower clocks and power. A MIG slice is left out: its name gives a profile, not its share of SMs.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200", "NVL"), 835.0),
    (("H200",), 989.0),
    (("H100", "NVL"), 835.0),
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.0),
    (("A100",), 312.0),  # SXM4 and PCIe alike
)
UNKNOWN_PARTS = ("MIG",)
PEAK_ENV = "FLOWPP_PEAK_TFLOPS"
"""Overrides the table (any device, CPU included): the MFU denominator per worker, in TFLOP/s."""

aten = torch.ops.aten


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """FLOP/s of the device's dense bf16 peak; None where unknown (a MIG slice, a CPU, another card)."""
    if override_tflops:
        return override_tflops * 1e12
    name = device_name.upper()
    if any(part in name for part in UNKNOWN_PARTS):
        return None
    return next((t * 1e12 for parts, t in PEAK_BF16_TFLOPS if all(p in name for p in parts)), None)


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """``peak_flops`` of a torch device: the override, else ``FLOWPP_PEAK_TFLOPS``, else the
    table for a CUDA device's name; None on a CPU without an override."""
    if not override_tflops and os.environ.get(PEAK_ENV):
        override_tflops = float(os.environ[PEAK_ENV])
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def mfu(flops_per_image: float | None, images_s: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation, a fraction; None when any input is unknown."""
    if not (flops_per_image and images_s and peak):
        return None
    return flops_per_image * images_s / peak


def _sdpa_cpu(q, k, v, *args, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward(grad_out, q, k, v, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, silent, with the CPU kernel of fused attention mapped to torch's own
    SDPA formulas (its table has CUDA's flash, efficient and cuDNN kernels only)."""
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
        },
    )


def train_flops_per_image(config, device: torch.device | str = "cpu") -> float:
    """Forward + backward FLOPs of one image through a fresh model of ``config`` (a FlowConfig)
    without checkpointing or compiling. The global RNG state is left as it was: a resumed run
    draws the same numbers as an uninterrupted one."""
    from flowpp import build_model
    from flowpp.distributed import data_dependent_init
    from flowpp.ops import plain_autograd

    device = torch.device(device)
    cfg = config.replace(checkpoint="none", compile=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_model(cfg).to(device).train()
        data_dependent_init(model, torch.randint(0, cfg.num_levels, (2, *cfg.shape), device=device))
        x = torch.randint(0, cfg.num_levels, (1, *cfg.shape), device=device)
        counter = flop_counter()
        with counter, plain_autograd():  # the gated convs' backward recompute is not the model's work
            (-model(x).mean()).backward()
    return float(counter.get_total_flops())
