"""One optimiser step, and the collectives it needs: importable with torch alone.

``train_step`` is what the Ray Train loop (orchestrator/training/loop.py), ``flowpp smoke`` and the
benchmarks in bench/ (on a GPU machine too, where the orchestrator's other dependencies
may be missing) all run.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from flowpp import FlowPlusPlus
from flowpp.distributed import all_sum, world_rank_size  # noqa: F401  (re-exported: the step's collectives)


def ddp_options() -> dict:
    """How the trainer wraps the model in DDP (``ray.train.torch.prepare_model``'s parallel_strategy_kwargs).

    - ``gradient_as_bucket_view``: gradients live in DDP's all-reduce buckets, so no gradient is
      copied into its bucket and back each step.
    - No buffer sync on every forward: the only buffers are the data-init flags, equal on every
      rank after the init broadcast and never changed by a step (887 tensors for imagenet64).
      torch 2.13 renamed the switch ``forward_sync_buffers``; older releases call it ``broadcast_buffers``.
    """
    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {"gradient_as_bucket_view": True, no_sync: False}


def step_noise(model: FlowPlusPlus, x: torch.Tensor, *, seed: int, step: int, rank: int, world: int,
               generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """The dequantizer's noise for ``x``, this rank's share of ``step``'s global batch.

    It is drawn for the whole global batch from (``seed``, ``step``) alone and cut at the rank's
    place, so each image of a step gets the same noise at any world size: with the data plan's
    strands (a step holds the same images, rank after rank), a run resumed on another world size
    trains as the one that never stopped, up to the order of float sums. ``generator`` is on
    ``x``'s device; it is seeded afresh each step, so a resume needs none of its state.
    """
    generator.manual_seed((seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % 2**63)
    b = x.shape[0]
    dtype = next(model.parameters()).dtype
    noise = model.dequantizer.draw((b * world, *x.shape[1:]), device=x.device, dtype=dtype, generator=generator)
    return noise[rank * b : (rank + 1) * b]


@dataclass
class StepResult:
    loss: float
    """Training bits/dim of the batch (non-finite when the loss was)."""
    grad_norm: float
    """The gradient's global norm before clipping; NaN for a skipped step."""
    skipped: bool


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    *,
    lr: float,
    grad_clip: float,
    micro: int = 0,
    noise: torch.Tensor | None = None,
):
    """One optimiser step on integer pixels ``x`` (B, C, H, W), minimising bits/dim.

    ``micro``: put at most this many images through the model at once; the gradients of the
    micro-batches add up (each loss weighted by its share of ``x``) before the one step, and a DDP
    model all-reduces on the last micro-batch only (``no_sync`` before it). 0: all at once.
    ``noise``: the dequantizer's noise for ``x`` (``step_noise``), or None to draw it from torch's
    generator.

    A non-finite loss or gradient on any rank skips the step on every rank (the finite flag
    is all-reduced), leaving the weights untouched. The step reads from the device once: the
    loss, the gradient norm and that flag in one copy, which decides whether Adam steps.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)  # before the forward: the last step's gradients never meet its activations
    parts = x.split(micro) if 0 < micro < x.shape[0] else (x,)
    noises = (None,) * len(parts) if noise is None else noise.split(parts[0].shape[0])
    no_sync = getattr(model, "no_sync", None)  # DDP's: no all-reduce in this backward
    losses = []
    for i, (part, part_noise) in enumerate(zip(parts, noises, strict=True)):
        last = i == len(parts) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            log_p = model(part) if part_noise is None else model(part, part_noise)
            part_loss = -log_p.mean() / (x[0].numel() * math.log(2))
            if len(parts) > 1:
                part_loss = part_loss * (part.shape[0] / x.shape[0])  # its share of the batch's mean
            part_loss.backward()  # on every rank, finite or not: DDP's all-reduce must meet on each of them
        losses.append(part_loss.detach().float())
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    finite = (torch.isfinite(loss) & torch.isfinite(grad_norm)).float()
    if world_rank_size()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # on the loss's device: NCCL takes CUDA tensors only
    loss_value, norm, ok = torch.stack([loss, grad_norm.float(), finite]).tolist()  # the step's one device read
    if not ok:
        opt.zero_grad(set_to_none=True)
        return StepResult(loss_value, float("nan"), True)
    opt.step()
    return StepResult(loss_value, norm, False)
