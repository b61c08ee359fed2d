"""Host work per training step: the ops a step dispatches, counted on the CPU.

On a GPU each dispatched op is a kernel launch (or more) that the host must issue, so the count
bounds how launch-bound an eager step is. This counts them with a ``TorchDispatchMode`` over one
training step of ``--preset`` (default imagenet64) at ``--batch`` (default 1) under a 2-rank gloo
DDP group, as the trainer runs it: ``train_step`` on the DDP model (forward, backward with DDP's
gradient all-reduce, clipping, Adam), then ``EMA.update``. One warm-up step
runs first (Adam's state, DDP's buckets). Rows: the step by phase, and the ops by name that
dominate.

    python bench/host_ops.py                      # this checkout
    python bench/host_ops.py --against 2b5878d    # and the same count on another commit, side by side

``--against REV`` checks REV out into a temporary git worktree and runs this same script there
with PYTHONPATH pointing at it, so both columns count the library code of their own commit. It
imports ``train_step`` (and ``ddp_options``) from where REV has them (``step_module``):
``orchestrator/training/step.py`` since issue 27's split of orchestrator/, ``orchestrator/step.py``
before it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("train_step", "ema.update", "total")


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher below autograd (what a device would run)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


# Where the checked-out commit keeps train_step and ddp_options, newest layout first.
STEP_MODULES = ("orchestrator.training.step", "orchestrator.step")


def step_module(names: tuple[str, ...] = STEP_MODULES):
    """The first of ``names`` that this checkout has: a commit before issue 27 has orchestrator/step.py,
    one after it orchestrator/training/step.py. A module that exists but fails to import raises."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):  # a missing import inside it
                raise
    raise ModuleNotFoundError(f"none of {', '.join(names)} in this checkout")


def _ddp(model, step):
    """The trainer's DDP wrapping: its options where this commit defines them, else DDP's defaults."""
    from torch.nn.parallel import DistributedDataParallel

    options = getattr(step, "ddp_options", None)  # before issue 25 there was none: prepare_model passed none
    return DistributedDataParallel(model, **(options() if options else {}))


def _rank(rank: int, world: int, port: int, preset: str, batch: int, path: str) -> None:
    from flowpp import build_model, get_preset
    from flowpp.distributed import data_dependent_init
    from flowpp.ema import EMA

    step_mod = step_module()
    train_step = step_mod.train_step
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        cfg = get_preset(preset)
        x = torch.randint(0, cfg.num_levels, (batch, *cfg.shape), dtype=torch.uint8)
        model = build_model(cfg)
        data_dependent_init(model, x if rank == 0 else None)
        ddp, ema = _ddp(model, step_mod), EMA(model)
        # fused: jobs/imagenet64.yaml's train.fused_adam (one kernel for every parameter, on GPU and CPU)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)
        counts = {}
        for counting in (False, True):  # a warm-up step, then the counted one
            step, update = OpCounter(), OpCounter()
            with step if counting else _null():
                result = train_step(ddp, opt, x, lr=1e-5, grad_clip=1.0)
            with update if counting else _null():
                ema.update(model)
            counts = {"train_step": step.ops, "ema.update": update.ops}
        if rank == 0:
            Path(path).write_text(json.dumps({**counts, "skipped": bool(result.skipped)}))
    finally:
        dist.destroy_process_group()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count(preset: str, batch: int) -> dict:
    """{phase: Counter of op names} of rank 0's counted step."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.json")
        mp.spawn(_rank, args=(2, _free_port(), preset, batch, out), nprocs=2, join=True)
        raw = json.loads(Path(out).read_text())
    counts = {phase: Counter(raw[phase]) for phase in PHASES[:2]}
    counts["total"] = counts["train_step"] + counts["ema.update"]
    return counts


def count_at(rev: str, preset: str, batch: int) -> dict:
    """``count`` on commit ``rev``: this script run in a temporary worktree of it."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(["git", "worktree", "add", "--detach", "-q", tree, rev], cwd=ROOT, check=True)
        try:
            env = {**os.environ, "PYTHONPATH": tree}
            cmd = [sys.executable, __file__, "--json", "--preset", preset, "--batch", str(batch)]
            text = subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True).stdout
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=True)
    raw = json.loads(text.splitlines()[-1])
    return {phase: Counter(raw[phase]) for phase in PHASES}


def table(columns: dict[str, dict], top: int) -> list[str]:
    """Markdown: phases, then the ``top`` op names by the first column's total, one column each."""
    names = list(columns)
    lines = ["| ops per step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for phase in PHASES:
        lines.append(f"| **{phase}** | " + " | ".join(f"{sum(c[phase].values()):,}" for c in columns.values()) + " |")
    if len(names) == 2:
        a, b = (sum(c["total"].values()) for c in columns.values())
        lines.append(f"| change of total | | {100 * (b - a) / a:+.1f}% |")
    ranked = (columns[names[0]]["total"] + columns[names[-1]]["total"]).most_common(top)
    for op, _ in ranked:
        lines.append(f"| {op} | " + " | ".join(f"{c['total'][op]:,}" for c in columns.values()) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/host_ops.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="imagenet64", help="flowpp preset")
    p.add_argument("--batch", type=int, default=1, help="per-rank batch")
    p.add_argument("--against", metavar="REV", help="also count on this commit (a column before this checkout's)")
    p.add_argument("--top", type=int, default=12, help="op names listed")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # for --against's child
    args = p.parse_args(argv)
    here = count(args.preset, args.batch)
    if args.json:
        print(json.dumps({phase: dict(c) for phase, c in here.items()}))
        return 0
    columns = {}
    if args.against:
        columns[args.against] = count_at(args.against, args.preset, args.batch)
    columns["this checkout"] = here
    print(f"ops dispatched per training step: preset {args.preset}, batch {args.batch} per rank, 2-rank gloo DDP, "
          f"rank 0, after one warm-up step")  # fmt: skip
    print("\n".join(table(columns, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
