"""Rank-consistent data-dependent initialisation under ``torch.distributed``.

ActNorm and the coupling-net convolutions initialise from the statistics of the
first batch they see. Under DDP every rank sees a different batch, so each would
initialise differently, and DDP would silently average gradients of different
models. Here rank 0 initialises from its batch and every parameter and buffer is
then broadcast from it, so all ranks start identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flowpp.datainit import DataInit


@torch.no_grad()
def data_dependent_init(model: nn.Module, batch: torch.Tensor | None, src: int = 0, group=None) -> None:
    """Run the init forward pass on rank ``src`` and broadcast the result to all ranks.

    ``batch`` is only read on rank ``src`` (the others may pass None). The model must
    already sit on the device of the process group's backend (CUDA for NCCL): the
    broadcast sends its parameters in place. Without a process group this is a plain
    local init.
    """
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank(group) == src:
        if batch is None:
            raise ValueError("data_dependent_init: the source rank needs a batch")
        was_training = model.training
        model.train()
        with torch.compiler.set_stance("force_eager"):  # init branches on data: never trace it
            model(batch)
        model.train(was_training)
    if distributed:
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=src, group=group)
    mark_ready(model)


def mark_ready(model: nn.Module) -> None:
    """Set every data-init layer's Python flag from its ``initialized`` buffer, in one device read.

    After the broadcast the other ranks hold rank ``src``'s flags, but only as buffers: a layer that
    first reads its buffer inside a compiled region makes a data-dependent graph break (and, on a GPU,
    a sync per layer in eager mode). Reading them all here, once, keeps every rank's forward on the
    Python flag alone, as on rank ``src``.
    """
    layers = [m for m in model.modules() if isinstance(m, DataInit)]
    if layers:
        flags = torch.stack([m.initialized for m in layers]).tolist()
        for layer, flag in zip(layers, flags, strict=True):
            layer.set_ready(bool(flag))


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
