"""Activation checkpointing, applied at build time by walking the module tree.

``attention`` recomputes each attention block (gated attention and the layer norm
after it, ``CouplingBlock.attend``) in the backward pass instead of storing its
activations; ``all`` does so for every coupling-net block, convolutions included. The
wrapped module keeps its parameters where they were, so state_dict keys do not
change, and RNG state is preserved, so dropout masks match on recomputation.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from flowpp.nets import CouplingBlock

MODES = ("none", "attention", "all")


def _checkpointed(module: nn.Module, method: str, *args):
    fn = getattr(type(module), method)
    if not module.training:
        return fn(module, *args)
    return checkpoint(fn, module, *args, use_reentrant=False, preserve_rng_state=True)


def apply_checkpointing(model: nn.Module, mode: str) -> int:
    """Wrap the target modules' forward in place; returns how many were wrapped."""
    if mode not in MODES:
        raise ValueError(f"checkpoint={mode!r}: expected one of {MODES}")
    if mode == "none":
        return 0
    method = "attend" if mode == "attention" else "forward"
    count = 0
    for module in model.modules():
        if isinstance(module, CouplingBlock) and (mode == "all" or module.attn is not None):
            setattr(module, method, functools.partial(_checkpointed, module, method))
            count += 1
    return count
