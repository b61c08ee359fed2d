"""What a rank carries from step to step: the record the loop advances and ``checkpoint`` saves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from flowpp import FlowPlusPlus
    from flowpp.ema import EMA
    from orchestrator.data.stream import ShardStream

__all__ = ["Stateful", "TrainState"]


class Stateful(Protocol):
    """What a checkpoint saves: anything with ``state_dict`` and ``load_state_dict``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


@dataclass
class TrainState:
    """Everything a rank carries from step to step; ``checkpoint`` saves and restores it."""

    model: FlowPlusPlus
    """The bare model: EMA, evaluation, sampling and checkpoints use it."""
    ddp_model: nn.Module
    """The same parameters behind DDP (the model itself on one worker): the train step uses it."""
    ema: EMA
    opt: torch.optim.Optimizer
    train_stream: ShardStream
    """Its ``state_dict()`` is this rank's position in the data plan."""
    step: int = 0
    stats: dict = field(default_factory=lambda: {"nonfinite_skipped": 0})
    """Counters that survive a restart (skipped steps), and the last validation bits/dim."""

    def tensor_states(self) -> dict[str, Stateful]:
        """The objects whose ``state_dict`` goes into ``state.pt`` (tensors in plain containers), by
        name. State added to training goes here (or to ``json_states``), not into ``checkpoint``."""
        return {"model": self.model, "ema": self.ema, "optimizer": self.opt}

    def json_states(self) -> dict[str, Stateful]:
        """The objects whose ``state_dict`` is plain JSON, kept in ``meta.json``, by name."""
        return {"stream": self.train_stream}
