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
