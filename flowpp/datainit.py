"""The data-dependent-init flag that ActNorm and the coupling-net convolutions share.

Each keeps a bool buffer ``initialized`` (so that checkpoints, EMA copies and DDP
broadcasts carry it) and a plain Python mirror of it. The buffer is read, which on a
GPU is a device sync, only until it is first found True; after that the forward pass
branches on the Python flag alone. That keeps the eager step free of a sync per layer,
and lets ``torch.compile`` trace the layer without a data-dependent graph break.
Loading a state dict sets the mirror from the loaded buffer (outside any compiled region).
"""

from __future__ import annotations

import torch
from torch import nn


class DataInit(nn.Module):
    initialized: torch.Tensor  # a bool buffer: data-dependent init has run

    def __init__(self):
        super().__init__()
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False
        self.register_load_state_dict_post_hook(DataInit._sync_flag)

    @staticmethod
    def _sync_flag(module: DataInit, incompatible_keys) -> None:
        module._ready = bool(module.initialized)

    def needs_init(self) -> bool:
        """True while the data-dependent init has yet to run."""
        if not self._ready:
            self._ready = bool(self.initialized)
        return not self._ready

    def set_ready(self, ready: bool) -> None:
        """Set the Python mirror from a value already read (``flowpp.distributed.mark_ready``)."""
        self._ready = ready

    def mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._ready = True
