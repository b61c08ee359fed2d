"""The model's FLOPs: forward + backward of one training image, counted by torch's ``FlopCounterMode``.

Neither the forward that activation checkpointing recomputes nor the gated convolution that
``flowpp.ops`` recomputes in backward is counted: model FLOPs, the numerator of MFU
(``orchestrator.training.mfu``).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flop_counter", "train_flops_per_image"]

aten = torch.ops.aten


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
