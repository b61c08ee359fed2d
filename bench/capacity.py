"""The measured inputs of infra/README.md's capacity plan, for the ``imagenet64`` preset.

Run from the repository root (``make setup`` installs the package; else prefix ``PYTHONPATH=.``)::

    python bench/capacity.py [--batches 1,2] [--target-batch 9] [--modes none,attention] [--threads 1]
                             [--time-steps 0] [--device cuda|cpu]

Three tables, each device-independent, so a CPU-only machine measures what a GPU worker holds:

1. **State**: parameters, and the tensors of the ``state.pt`` that orchestrator/training/loop.py's
   ``save_checkpoint`` writes (model state_dict, EMA shadow, Adam state), in bytes.
2. **FLOPs** of one training step per image (forward + backward) from torch's ``FlopCounterMode``.
   Its table has no entry for the CPU kernel of fused attention, so that op is counted with
   torch's own SDPA formulas. Activation checkpointing adds the recomputed forward.
3. **Memory** of one steady-state training step (forward, backward, grad-norm clip, Adam step,
   with Adam's state already allocated), per checkpoint mode and batch size:
   - ``held after forward``: bytes alive when the loss is computed, i.e. what the graph keeps
     for the backward pass;
   - ``step peak``: the highest bytes alive at any moment of the step.
   Both exclude the parameters, their Adam state and the input, which are counted in table 1.
   Bytes are tracked per tensor storage by a ``TorchDispatchMode`` (allocated when an op returns
   a new storage, freed when the storage dies), so they are exact and the same on any device
   save for kernel workspaces (cuDNN, NCCL) and the CUDA allocator's rounding. Saved-tensor hooks
   would miss the inputs that non-reentrant checkpointing keeps in its own frame, and every
   temporary of the backward pass.
   The per-image slope (batch 2 minus batch 1) extrapolates to ``--target-batch``, which is
   then measured directly as a check. The same pass counts the non-view aten ops of forward and
   backward: on a GPU each launches at least one kernel, so with eager PyTorch's per-op host
   overhead they put a floor under the step time however fast the GPU.

With ``--time-steps N`` it also times N real steps at the target batch on ``--device`` (CUDA by
default where present, with ``torch.cuda.max_memory_allocated``): on a GPU node, the measurement
that replaces the plan's assumed step time.

The default run takes about 3 minutes on one core of the development machine.
"""

from __future__ import annotations

import argparse
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.timing import sync
from flowpp import build_model, get_preset
from flowpp.distributed import data_dependent_init
from flowpp.flops import flop_counter

PRESET = "imagenet64"
MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created under this mode and still alive; and their peak."""

    def __init__(self, external: list[torch.Tensor]):
        super().__init__()
        # Views of these (parameters, optimizer state, the input) must not count as new memory.
        self._seen = {t.untyped_storage().data_ptr() for t in external}
        self.current = self.peak = 0
        self.ops = 0  # non-view ops: each is at least one kernel launch on a GPU

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += not func.is_view
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self._seen:
                self._seen.add(key)
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def build(mode: str, seed: int = 0, preset: str = PRESET, device: torch.device | str = "cpu", config=None):
    """The preset (or ``config``, a FlowConfig) with ActNorm initialised, as the trainer has it
    after its first batch."""
    torch.manual_seed(seed)
    cfg = (config or get_preset(preset)).replace(checkpoint=mode, compile=False)
    model = build_model(cfg).to(device)
    data_dependent_init(model, torch.randint(0, cfg.num_levels, (2, *cfg.shape), device=device))
    return model.train(), cfg


def adam_with_state(model) -> torch.optim.Adam:
    """Adam as orchestrator/training/loop.py builds it, with its state allocated by a zero-gradient step."""
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # a zero gradient moves nothing: exp_avg = 0, the update is 0 / (0 + eps)
    opt.zero_grad(set_to_none=True)
    return opt


def nbytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors``, as torch.save writes them."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def tensors_in(obj) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def state_table() -> list[tuple[str, int, int]]:
    model, _ = build("none")
    opt = adam_with_state(model)
    params = list(model.parameters())
    rows = [
        ("parameters", sum(p.numel() for p in params), nbytes(params)),
        ("buffers", sum(b.numel() for b in model.buffers()), nbytes(model.buffers())),
        ("state.pt: model state_dict", 0, nbytes(model.state_dict().values())),
        # flowpp.ema.EMA keeps a float32 copy of every parameter
        ("state.pt: EMA shadow", 0, sum(p.numel() * 4 for p in params)),
        ("state.pt: Adam state", 0, nbytes(tensors_in(opt.state_dict()["state"]))),
    ]
    total = sum(r[2] for r in rows if r[0].startswith("state.pt"))
    return [*rows, ("state.pt: total", 0, total)]


def count_flops(mode: str, preset: str = PRESET, device: torch.device | str = "cpu", config=None) -> dict:
    """FLOPs of one training step on one image, in total and in fused attention.

    Any device: torch's table has CUDA's fused attention kernels (flash, efficient, cuDNN) and
    the CPU kernel is mapped below. ``mode="none"`` gives the model's FLOPs; a checkpoint mode
    adds its recomputed forward.
    """
    model, cfg = build(mode, preset=preset, device=device, config=config)
    x = torch.randint(0, cfg.num_levels, (1, *cfg.shape), device=device)
    counter = flop_counter()
    with counter:
        loss = -model(x).mean()
        forward = counter.get_total_flops()
        loss.backward()
    by_op = counter.get_flop_counts()["Global"]
    attention = sum(v for k, v in by_op.items() if "scaled_dot_product" in str(k))
    return {"forward": forward, "step": counter.get_total_flops(), "attention": attention}


def measure_memory(mode: str, batch: int) -> dict:
    model, cfg = build(mode)
    opt = adam_with_state(model)
    x = torch.randint(0, cfg.num_levels, (batch, *cfg.shape))
    external = [*model.parameters(), *model.buffers(), *tensors_in(opt.state_dict()["state"]), x]
    started = time.perf_counter()
    with LiveBytes(external) as live:
        loss = -model(x).mean()
        held = live.current
        loss.backward()
        ops = live.ops  # forward + backward; the optimizer's count depends on its foreach/fused kernels
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"held": held, "peak": live.peak, "ops": ops, "seconds": time.perf_counter() - started}


def time_steps(mode: str, batch: int, steps: int, device: torch.device) -> dict:
    """Mean seconds of ``steps`` training steps after two warm-up steps; peak memory on CUDA."""
    model, cfg = build(mode)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    x = torch.randint(0, cfg.num_levels, (batch, *cfg.shape), device=device)

    def step() -> None:
        loss = -model(x).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"seconds": seconds, "images_s": batch / seconds, "peak": peak}


def print_state() -> None:
    print(f"## State of the `{PRESET}` preset\n\n| item | elements | bytes | MiB |\n|---|---:|---:|---:|")
    for name, count, size in state_table():
        elements = f"{count:,}" if count else ""
        print(f"| {name} | {elements} | {size:,} | {size / MIB:,.1f} |")


def print_flops(modes: list[str]) -> None:
    print("\n## FLOPs per image, one training step\n")
    print("| checkpoint | forward GFLOP | forward + backward GFLOP | of which fused attention |\n|---|---:|---:|---:|")
    for mode in modes:
        f = count_flops(mode)
        print(f"| {mode} | {f['forward'] / 1e9:.1f} | {f['step'] / 1e9:.1f} | {f['attention'] / 1e9:.1f} |")


def print_memory(modes: list[str], small: int, large: int, target: int) -> None:
    print("\n## Memory of one training step above parameters and Adam state (MiB)\n")
    print("| checkpoint | batch | held after forward | step peak | fwd+bwd ops | step time on this CPU (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    slopes = {}
    for mode in modes:
        runs = {b: measure_memory(mode, b) for b in dict.fromkeys((small, large, target)) if b}
        for b, r in runs.items():
            held, peak = r["held"] / MIB, r["peak"] / MIB
            print(f"| {mode} | {b} | {held:,.1f} | {peak:,.1f} | {r['ops']:,} | {r['seconds']:.1f} |")
        slopes[mode] = (runs[small], runs[large], runs.get(target))
    print("\n## Held after forward: per image, and extrapolated to the target batch (MiB)\n")
    print(f"| checkpoint | per image | fixed | extrapolated to {target} | measured at {target} |")
    print("|---|---:|---:|---:|---:|")
    for mode, (a, b, t) in slopes.items():
        per_image = (b["held"] - a["held"]) / (large - small)
        fixed = a["held"] - small * per_image
        measured = f"{t['held'] / MIB:,.1f}" if t else "-"
        print(
            f"| {mode} | {per_image / MIB:,.1f} | {fixed / MIB:,.1f} | {(fixed + target * per_image) / MIB:,.1f} "
            f"| {measured} |"
        )


def print_timing(modes: list[str], batch: int, steps: int, device: torch.device) -> None:
    print(f"\n## Timed training steps on {device} (batch {batch}, {steps} steps after 2 warm-up)\n")
    print("| checkpoint | ms/step | images/s | peak allocated (MiB, CUDA only) |\n|---|---:|---:|---:|")
    for mode in modes:
        r = time_steps(mode, batch, steps, device)
        print(f"| {mode} | {r['seconds'] * 1e3:,.1f} | {r['images_s']:,.1f} | {r['peak'] / MIB:,.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,2", help="two batch sizes for the per-image slope")
    ap.add_argument("--target-batch", type=int, default=9, help="per-GPU batch of the plan (72 / 8); 0: skip")
    ap.add_argument("--modes", default="none,attention", help="checkpoint modes: none, attention, all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-steps", type=int, default=0, help="also time this many steps at the target batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --time-steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    small, large = (int(b) for b in args.batches.split(","))
    modes = args.modes.split(",")
    started = time.perf_counter()
    print_state()
    print_flops(modes)
    print_memory(modes, small, large, args.target_batch)
    if args.time_steps:
        print_timing(modes, args.target_batch or large, args.time_steps, torch.device(args.device))
    print(f"\n{time.perf_counter() - started:.0f} s in all, torch {torch.__version__}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
