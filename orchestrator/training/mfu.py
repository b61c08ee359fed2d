"""How much of its device a training run uses: the device's peak and MFU (the model's FLOPs per
image are counted with the model, in ``flowpp.flops``).

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
