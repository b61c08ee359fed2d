"""Activation checkpointing, applied at build time by walking the module tree.

``attention`` recomputes each gated attention in the backward pass instead of
storing its activations; ``all`` does so for every coupling-net block. The
wrapped module keeps its parameters where they were, so state_dict keys do not
change, and RNG state is preserved, so dropout masks match on recomputation.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from flowpp.nets import CouplingBlock, GatedAttention

MODES = ("none", "attention", "all")


def _checkpointed_forward(module: nn.Module, *args):
    forward = type(module).forward
    if not module.training:
        return forward(module, *args)
    return checkpoint(forward, module, *args, use_reentrant=False, preserve_rng_state=True)


def apply_checkpointing(model: nn.Module, mode: str) -> int:
    """Wrap the target modules' forward in place; returns how many were wrapped."""
    if mode not in MODES:
        raise ValueError(f"checkpoint={mode!r}: expected one of {MODES}")
    if mode == "none":
        return 0
    target = GatedAttention if mode == "attention" else CouplingBlock
    count = 0
    for module in model.modules():
        if isinstance(module, target):
            module.forward = functools.partial(_checkpointed_forward, module)
            count += 1
    return count
