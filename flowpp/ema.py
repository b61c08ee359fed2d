"""Exponential moving average (Polyak averaging) of a model's parameters.

The official recipe evaluates and samples with EMA weights (decay 0.999). The
shadow copy is kept in float32 whatever the model's dtype; buffers (ActNorm's
``initialized`` flags) are not averaged.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module):
        """Temporarily swap the EMA weights into ``model`` (for evaluation or sampling)."""
        backup = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(backup[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model; differing keys: {sorted(missing)[:5]}")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        # onto the device of the live shadow (a checkpoint is read onto the CPU)
        self.shadow = {k: v.to(self.shadow[k].device, torch.float32, copy=True) for k, v in state["shadow"].items()}
