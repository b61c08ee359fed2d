"""One distributed training run on a rank: the loop (``loop``), the record it advances
(``state``), the optimiser step and its collectives (``step``), checkpoints (``checkpoint``),
model FLOP utilisation (``mfu``) and the data audit trail (``trace``).

May import: ``orchestrator.core``, ``config``, ``data``, ``tracking``, ``evaluation``, ``flowpp``.
Importing the package loads none of its modules (they import torch).
"""

__all__ = ["checkpoint", "loop", "mfu", "state", "step", "trace"]
