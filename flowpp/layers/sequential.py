"""Composition of invertible layers: the one loop every flow in the model runs.

The main flow, each flow step and the dequantizer's flow are all chains of layers
with ``forward(x, cond=None) -> (y, logdet)`` and ``inverse(y, cond=None) -> x``. A
chain is itself such a layer: its logdet is the sum of its layers' logdets, and its
inverse runs the layers' inverses in reverse order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def chain_forward(layers: Iterable[Any], x: torch.Tensor, cond=None):
    """x (B, ...) through every layer in order -> (y, logdet (B,)), logdet summed left to right."""
    logdet = x.new_zeros(x.shape[0])
    for layer in layers:
        x, ld = layer(x, cond)
        logdet = logdet + ld
    return x, logdet


def chain_inverse(layers: Iterable[Any], y: torch.Tensor, cond=None) -> torch.Tensor:
    """y (B, ...) through every layer's inverse, last layer first."""
    for layer in reversed(list(layers)):
        y = layer.inverse(y, cond)
    return y


class InvertibleSequential(nn.ModuleList):
    """A flat list of invertible layers that is itself one, named ``0``, ``1``, ...

    A ModuleList rather than a Sequential-like wrapper, so that build-time wrappers
    (checkpointing, compile, DDP/FSDP) see the steps as plain ``named_children()``.
    ``cond`` (e.g. the dequantizer's context) goes to every layer.
    """

    def forward(self, x: torch.Tensor, cond=None):
        return chain_forward(self, x, cond)

    def inverse(self, y: torch.Tensor, cond=None) -> torch.Tensor:
        return chain_inverse(self, y, cond)
