"""Exponential moving average (Polyak averaging) of a model's parameters.

The official recipe evaluates and samples with EMA weights (decay 0.999). The
shadow copy is kept in float32 whatever the model's dtype; buffers (ActNorm's
``initialized`` flags) are not averaged.

The update runs every training step, so it is written as foreach ops over all
parameters at once: one ``_foreach_lerp_`` (after one ``_foreach_copy_`` into float32 for
a model whose parameters are not float32), where a loop would dispatch two ops for each of
the imagenet64 preset's 2,604 parameter tensors, each a kernel launch on a GPU.
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
        self._staging: list[torch.Tensor] | None = None  # float32 copies of a low-precision model's parameters

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the model's parameters, their shadows), in the same order."""
        params: list[torch.Tensor] = [p for _, p in model.named_parameters()]
        return params, [self.shadow[k] for k, _ in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        params, shadow = self._pairs(model)
        if any(p.dtype != torch.float32 for p in params):  # a bf16 or fp16 model: cast into a float32 copy
            if self._staging is None:
                self._staging = [torch.empty_like(s) for s in shadow]  # once: the update stays 2 ops
            torch._foreach_copy_(self._staging, params)
            params = self._staging
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params, shadow = self._pairs(model)
        torch._foreach_copy_(params, shadow)  # casts to each parameter's dtype

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module):
        """Temporarily swap the EMA weights into ``model`` (for evaluation or sampling)."""
        params, _ = self._pairs(model)
        with torch.no_grad():
            backup = torch._foreach_mul(params, 1.0)  # one foreach copy of every parameter
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)

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
        self._staging = None
