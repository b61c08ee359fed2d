"""One optimiser step, and the collectives it needs: importable with torch alone.

``train_step`` is what the Ray Train loop (orchestrator/train.py), ``flowpp smoke`` and the
benchmarks in bench/ (on a GPU machine too, where the orchestrator's other dependencies
may be missing) all run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def world_rank_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float] | torch.Tensor, device: torch.device | None = None) -> list[float]:
    """Sum ``values`` over every rank (a no-op on one); one host sync.

    The reduced tensor lives on ``device``, or where ``values`` already is: pass the
    model's device, since NCCL takes CUDA tensors only.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach().to(torch.float64).reshape(-1)
    else:
        t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_rank_size()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class StepResult:
    loss: float
    """Training bits/dim of the batch (NaN when the loss was not finite)."""
    grad_norm: float
    skipped: bool


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, *, lr: float, grad_clip: float):
    """One optimiser step on integer pixels ``x`` (B, C, H, W), minimising bits/dim.

    A non-finite loss or gradient on any rank skips the step on every rank (the loss
    check is all-reduced; gradients already are), leaving the weights untouched.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)  # before the forward: the last step's gradients never meet its activations
    loss = -model(x).mean() / (x[0].numel() * math.log(2))
    if all_sum(torch.isfinite(loss.detach()))[0] != world_rank_size()[1]:  # on the loss's device
        return StepResult(float("nan"), float("nan"), True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)
        return StepResult(loss.item(), float("nan"), True)
    opt.step()
    return StepResult(loss.item(), grad_norm.item(), False)
