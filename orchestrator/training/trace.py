"""An audit trail of the data plan: per step, the sample keys each rank trained on.

With ``train.trace_dir`` set, every rank appends JSON lines to ``rank{r}.jsonl``: one per
step (``step``, ``keys``, ``skipped``, ``world``) and, at the end, a hash of its parameters and
the device they lived on; each with the rank, pid, node and wall-clock ``time``. Tests
use it to show that a restarted run trains on exactly the samples it had not seen, and
that every rank ends with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from torch import nn


class Trace:
    def __init__(self, directory: str | None, rank: int):
        self.path = Path(directory) / f"rank{rank}.jsonl" if directory else None
        self.rank = rank
        self._node: str | None = None

    def write(self, **record) -> None:
        if self.path is None:
            return
        if self._node is None:
            import ray

            self._node = ray.get_runtime_context().get_node_id()
        record = {**record, "rank": self.rank, "pid": os.getpid(), "node": self._node, "time": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def final(self, step: int, model: nn.Module) -> None:
        if self.path is not None:
            device = str(next(model.parameters()).device)
            self.write(final_step=step, params_sha256=param_digest(model), device=device)


def param_digest(model: nn.Module) -> str:
    """sha256 over every state_dict entry, in key order."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
