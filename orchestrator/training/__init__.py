"""One distributed training run on a rank: the loop (``loop``), the record it advances
(``state``), the optimiser step and its collectives (``step``), checkpoints (``checkpoint``), how
the ranks meet (``rendezvous``: torch's store on the master address alone),
the log line's figures (``meter``),
model FLOP utilisation (``mfu``), the data audit trail (``trace``) and the small protocol the loop
reports through (``tracker``: MLflow's ``RunLogger`` is one implementation, ``MemoryTracker`` another).

May import: ``orchestrator.core``, ``config``, ``data``, ``tracking``, ``evaluation``, ``flowpp``.
Importing the package loads none of its modules (they import torch).
"""

__all__ = ["checkpoint", "loop", "meter", "mfu", "rendezvous", "state", "step", "trace", "tracker"]
