"""Train-step cost of activation checkpointing: ``checkpoint=none|attention|all``.

Run from the repository root (``make setup`` installs the package; else prefix ``PYTHONPATH=.``)::

    python bench/train_step.py [--configs cifar10,narrow] [--modes none,attention,all]
                               [--steps 3] [--warmup 1] [--cifar-batch 4] [--device auto] [--threads 2]

For every (config, checkpoint mode) it times one full train step -- forward, backward,
``clip_grad_norm_(1.0)`` and an Adam step -- on random integer pixels and reports images/s,
the mean step time and the peak training memory. Configs:

- ``cifar10``: the preset at its own width (F=96, 10 blocks, K=32, dropout 0.2, pointwise),
  batch ``--cifar-batch``;
- ``narrow``: the same flow on 3x32x32 with hidden width 32, 10 blocks, K=32, 4 heads and
  attention on, in the main flow's and the dequantizer's nets (the dequantizer keeps its block
  count), batch 16.

``--variants`` adds the speed options, alone or joined with ``+`` (``compile+fused``):
``compile`` (flowpp.compile, inductor), ``reduce-overhead`` (compile with CUDA graphs),
``fused`` (fused Adam), ``channels_last`` and ``bf16`` (the nets under autocast). A compiled
variant's first warm-up step compiles; its time less a steady step is reported as the compile
time. On CUDA every row also gets its MFU: the model FLOPs per training image (bench/capacity.py)
times images/s over the device's dense bf16 peak (orchestrator/training/mfu.py's table).

``--compare VARIANT`` measures eager against VARIANT in one process, steps alternating
(A, B, A, B, ...) on two copies of the same initialised model, and reports the ratio: the
figure behind "compiled is N x faster", free of the drift between separate runs.

It also times ``model.sample(16)`` against ``model.log_prob`` of 16 images (eval mode, no grad,
alternating) at ``narrow``: sampling inverts the main flow once, scoring runs the dequantizer
and the main flow forward, and the goal is that sampling costs no more.

Every measurement runs in a fresh subprocess (this script with ``--worker``, JSON on stdout),
after model build, optimizer and data-dependent init. Peak memory: on CUDA,
``torch.cuda.max_memory_allocated`` over the warm-up and timed steps (everything allocated:
parameters, gradients, Adam state, activations); on CPU, the growth of the resident set over
them: peak ``ru_maxrss`` after the steps minus the RSS from ``/proc/self/statm`` just before the
first step (the high-water mark is reset there through ``/proc/self/clear_refs`` when the kernel
allows, so earlier peaks cannot hide it). The growth covers gradients, Adam state and
activations, not the parameters. Warm-up steps are not timed but count towards the peak.
On CPU the memory comes from a second worker that runs 2 untimed steps with glibc's
``MALLOC_MMAP_THRESHOLD_`` at 128 KiB (``--mmap-threshold``; 0: one worker, glibc defaults):
by default glibc keeps freed blocks of up to 32 MiB cached in its heap, so RSS stays above
the live tensors and hides part of what checkpointing frees, while the forced mmap/munmap
slows steps by ~50%, so timing runs keep glibc's defaults. "Saved activations" is exact and
device-independent: the bytes of the tensors autograd keeps for backward in one forward, each
storage counted once, parameters excluded. Step times: the mean, and the
best (less sensitive to other load on the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: bench.* resolves from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import sync, timed  # noqa: E402
from bench.variants import OPTIONS, apply_variant, parse_variant  # noqa: E402
from flowpp import build_model, get_preset  # noqa: E402
from flowpp.distributed import data_dependent_init  # noqa: E402
from orchestrator.training.step import train_step  # noqa: E402

CONFIGS = ("cifar10", "narrow")
MODES = ("none", "attention", "all")
GOAL_COMPILE = 1.3  # compiled step at least 1.3x faster than eager, once compiled
NARROW_BATCH, SAMPLE_N = 16, 16
GOAL_MEM, GOAL_TIME = 0.40, 0.30  # attention vs none: >= 40% less memory at <= 30% more time
ROOT = Path(__file__).resolve().parent.parent


def make_config(name: str, mode: str):
    cfg = get_preset("cifar10").replace(checkpoint=mode)
    if name == "cifar10":
        return cfg
    if name != "narrow":
        raise ValueError(f"unknown config {name!r}; choose from {CONFIGS}")
    net = dataclasses.replace(cfg.net, hidden=32, num_blocks=10, num_heads=4, attention=True)
    dq = dataclasses.replace(cfg.dequant, net=dataclasses.replace(cfg.dequant.net, hidden=32, num_heads=4))
    return cfg.replace(net=net, dequant=dq, num_components=32, image_size=32)


def setup(name: str, mode: str, batch: int, device: torch.device, variant: str = "eager"):
    """A data-dependently initialised model on ``device``, a fixed batch of random pixels, and its Adam."""
    cfg, fused = apply_variant(make_config(name, mode), variant)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.num_levels, (batch, *cfg.shape), dtype=torch.int64).to(device)
    model = build_model(cfg).to(device)
    data_dependent_init(model, x)
    return model, x, torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def reset_rss_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def saved_activation_mib(model, x) -> float:
    """MiB of tensors autograd keeps for backward in one training forward, each storage once.

    Exact and device-independent: it counts what checkpointing decides, not allocator caching.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.bits_per_dim(x).mean()
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params) / 2**20


def measure_train(
    name: str, mode: str, batch: int, steps: int, warmup: int, device: torch.device, variant: str = "eager"
) -> dict:
    model, x, opt = setup(name, mode, batch, device, variant)
    model.train()

    def step() -> float:
        return train_step(model, opt, x, lr=1e-4, grad_clip=1.0).loss

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_kib, reset = 0, True
    else:
        base_kib, reset = rss_kib(), reset_rss_peak()
    warm, _ = timed(step, warmup, device)
    times, loss = timed(step, steps, device)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
    step_s = sum(times) / len(times)
    compile_s = max(0.0, warm[0] - step_s) if warm and model.config.compile else None
    saved_mib = saved_activation_mib(model, x)
    return {"step_ms": 1e3 * step_s, "best_ms": 1e3 * min(times), "images_s": batch / step_s,
            "peak_mib": peak_mib, "saved_mib": saved_mib, "loss": loss, "peak_reset": reset,
            "compile_s": compile_s, "flops": flops_per_image(model.config, device)}  # fmt: skip


def flops_per_image(cfg, device: torch.device) -> float | None:
    """Model FLOPs of one training image (forward + backward), counted on CUDA only (for MFU)."""
    if device.type != "cuda":
        return None
    from flowpp.flops import train_flops_per_image

    return train_flops_per_image(cfg.replace(bf16=False, channels_last=False), device)


def measure_compare(name: str, mode: str, batch: int, steps: int, variant: str, device: torch.device) -> dict:
    """Eager against ``variant``, on twins with the same initial weights, steps alternating."""
    eager, x, opt_a = setup(name, mode, batch, device)
    other, _, opt_b = setup(name, mode, batch, device, variant)
    other.load_state_dict(eager.state_dict())
    eager.train(), other.train()
    first, _ = timed(lambda: train_step(other, opt_b, x, lr=1e-4, grad_clip=1.0), 1, device)  # compiles
    train_step(eager, opt_a, x, lr=1e-4, grad_clip=1.0)
    a, b = [], []
    for _ in range(steps):
        a += timed(lambda: train_step(eager, opt_a, x, lr=1e-4, grad_clip=1.0), 1, device)[0]
        b += timed(lambda: train_step(other, opt_b, x, lr=1e-4, grad_clip=1.0), 1, device)[0]
    a_s, b_s = sum(a) / steps, sum(b) / steps
    return {"variant": variant, "eager_ms": 1e3 * a_s, "other_ms": 1e3 * b_s, "speedup": a_s / b_s,
            "first_s": first[0], "compile_s": max(0.0, first[0] - b_s), "batch": batch}  # fmt: skip


def measure_sample(steps: int, warmup: int, device: torch.device) -> dict:
    """sample(16) against log_prob of 16 images, eval mode, no grad, alternating."""
    model, x, _ = setup("narrow", "none", NARROW_BATCH, device)
    model.eval()
    x = x[:SAMPLE_N]
    with torch.no_grad():
        for _ in range(warmup):
            model.sample(SAMPLE_N), model.log_prob(x)
        sample, score = [], []
        for _ in range(steps):
            sample += timed(lambda: model.sample(SAMPLE_N), 1, device)[0]
            score += timed(lambda: model.log_prob(x), 1, device)[0]
    sample_s, score_s = sum(sample) / steps, sum(score) / steps
    return {"call_s": sample_s, "images_s": SAMPLE_N / sample_s, "log_prob_s": score_s, "ratio": sample_s / score_s}


def spawn(args, worker: str, config="narrow", mode="none", steps=None, warmup=None, mmap_threshold=0,
          variant="eager") -> dict:  # fmt: skip
    """Run one measurement in a fresh interpreter and return its JSON result."""
    steps, warmup = args.steps if steps is None else steps, args.warmup if warmup is None else warmup
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--configs", config,
           "--modes", mode, "--steps", str(steps), "--warmup", str(warmup), "--device", args.device,
           "--threads", str(args.threads), "--cifar-batch", str(args.cifar_batch), "--variants", variant,
           "--compare", variant]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {worker} {config}/{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_train(args: argparse.Namespace, config: str, mode: str, variant: str = "eager") -> dict:
    result = spawn(args, "train", config, mode, variant=variant)
    if args.mmap_threshold and not args.device.startswith("cuda"):
        memory = spawn(
            args, "train", config, mode, steps=2, warmup=1 if variant != "eager" else 0,
            mmap_threshold=args.mmap_threshold, variant=variant,
        )  # fmt: skip
        result.update(peak_mib=memory["peak_mib"], peak_reset=memory["peak_reset"])
    return result


def pct(new: float, old: float) -> float:
    return 100.0 * (new - old) / old


def mfu_pct(r: dict, peak: float | None) -> str:
    if not (peak and r.get("flops")):
        return "-"
    return f"{100 * r['flops'] * r['images_s'] / peak:.2f}"


def device_peak(device: str) -> float | None:
    """The device's dense bf16 peak FLOP/s (orchestrator/training/mfu.py's table); None on CPU or unknown."""
    if not device.startswith("cuda"):
        return None
    from orchestrator.training.mfu import peak_flops

    return peak_flops(torch.cuda.get_device_name(torch.device(device)))


def report(args: argparse.Namespace, results: dict, sample: dict | None, compare: dict | None = None) -> None:
    cuda = args.device.startswith("cuda")
    peak = device_peak(args.device)
    mem_label = "peak mem (MiB, CUDA)" if cuda else "peak mem (MiB, RSS growth)"
    head = f"device: {args.device}, threads: {args.threads}, steps: {args.steps}, warm-up: {args.warmup}"
    if args.mmap_threshold and not cuda:
        head += f"; memory: 2 steps at MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"
    if cuda:
        head += "; MFU: " + (f"model FLOPs x images/s / {peak / 1e12:,.0f} TFLOP/s" if peak else "- (peak unknown)")
    print(f"\n{head}")
    if results:
        print()
        print_train_table(args, results, peak, mem_label)
    report_compare_and_sample(args, compare, sample)
    if results:
        report_memory_goal(results)


def print_train_table(args: argparse.Namespace, results: dict, peak: float | None, mem_label: str) -> None:
    print(f"| config | checkpoint | variant | batch | images/s | mean step (ms) | best step (ms) | {mem_label} "
          "| saved activations (MiB) | compile (s) | MFU % |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (config, mode, variant), r in results.items():
        batch = args.cifar_batch if config == "cifar10" else NARROW_BATCH
        cells = f"{r['images_s']:.2f} | {r['step_ms']:.0f} | {r['best_ms']:.0f} | {r['peak_mib']:.0f}"
        compile_s = "-" if r.get("compile_s") is None else f"{r['compile_s']:.0f}"
        cells += f" | {r['saved_mib']:.0f} | {compile_s} | {mfu_pct(r, peak)}"
        print(f"| {config} | {mode} | {variant} | {batch} | {cells} |")


def report_compare_and_sample(args: argparse.Namespace, compare: dict | None, sample: dict | None) -> None:
    if compare is not None:
        c = compare
        print(f"\n| config | checkpoint | batch | eager step (ms) | {c['variant']} step (ms) | speedup "
              "| first step (s) | compile (s) |\n|---|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
        print(f"| {args.configs} | {args.modes} | {c['batch']} | {c['eager_ms']:.0f} | {c['other_ms']:.0f} "
              f"| {c['speedup']:.2f}x | {c['first_s']:.0f} | {c['compile_s']:.0f} |")  # fmt: skip
        if "compile" in c["variant"] or "reduce-overhead" in c["variant"]:
            met = c["speedup"] >= GOAL_COMPILE
            print(f"- goal: the compiled step >= {GOAL_COMPILE}x faster than eager, once compiled: "
                  f"{c['speedup']:.2f}x -> {'MET' if met else 'NOT met'}")  # fmt: skip
    if sample is not None:
        print(f"\n| config | sample({SAMPLE_N}) (s) | images/s | log_prob({SAMPLE_N}) (s) | sample / log_prob |")
        print("|---|---:|---:|---:|---:|")
        print(f"| narrow | {sample['call_s']:.2f} | {sample['images_s']:.2f} | {sample['log_prob_s']:.2f} "
              f"| {sample['ratio']:.2f} |")  # fmt: skip
        met = sample["ratio"] <= 1.0
        print(f"- goal: sample({SAMPLE_N}) takes no longer than log_prob({SAMPLE_N}): "
              f"{sample['ratio']:.2f}x -> {'MET' if met else 'NOT met'}")  # fmt: skip


def report_memory_goal(results: dict) -> None:
    if not all(r["peak_reset"] for r in results.values()):
        print("\nnote: the RSS high-water mark could not be reset; earlier peaks may hide the step peak")
    print(f"\ngoal: attention checkpointing cuts peak training memory by >= {GOAL_MEM:.0%} "
          f"at <= {GOAL_TIME:.0%} extra step time")  # fmt: skip
    for config, variant in dict.fromkeys((c, v) for c, _, v in results):
        none, attn = results.get((config, "none", variant)), results.get((config, "attention", variant))
        if none is None or attn is None:
            print(f"- {config} ({variant}): needs both `none` and `attention` runs")
            continue
        mem_cut = -pct(attn["peak_mib"], none["peak_mib"])
        saved_cut = -pct(attn["saved_mib"], none["saved_mib"])
        extra = pct(attn["step_ms"], none["step_ms"])
        met = mem_cut >= 100 * GOAL_MEM and extra <= 100 * GOAL_TIME
        print(f"- {config} ({variant}): attention vs none: peak memory -{mem_cut:.1f}% (saved activations "
              f"-{saved_cut:.1f}%), step time {extra:+.1f}% -> goal {'MET' if met else 'NOT met'}")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list of cifar10,narrow")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of none,attention,all")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--cifar-batch", type=int, default=None, help="cifar10 batch (4 CPU, 64 CUDA)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-sample", action="store_true", help="skip the model.sample timing")
    p.add_argument("--mmap-threshold", type=int, default=128 * 1024, help="CPU: glibc MALLOC_MMAP_THRESHOLD_")
    p.add_argument("--variants", default="eager", help=f"comma list of eager or {'+'.join(OPTIONS)} combinations")
    p.add_argument("--compare", default="", help="a variant to time against eager, alternating (e.g. compile)")
    p.add_argument("--no-train", action="store_true", help="skip the train-step table (compare or sample only)")
    p.add_argument("--worker", choices=("train", "sample", "compare"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for variant in [*args.variants.split(","), *([args.compare] if args.compare else [])]:
        try:
            parse_variant(variant)
        except ValueError as e:
            p.error(str(e))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.steps = args.steps if args.steps is not None else (20 if cuda else 3)
    args.cifar_batch = args.cifar_batch if args.cifar_batch is not None else (64 if cuda else 4)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config, mode = args.configs, args.modes
    batch = args.cifar_batch if config == "cifar10" else NARROW_BATCH
    if args.worker == "train":
        print(json.dumps(measure_train(config, mode, batch, args.steps, args.warmup, device, args.variants)))
        return
    if args.worker == "compare":
        print(json.dumps(measure_compare(config, mode, batch, args.steps, args.compare, device)))
        return
    if args.worker == "sample":
        print(json.dumps(measure_sample(args.steps, args.warmup, device)))
        return
    configs, modes = args.configs.split(","), args.modes.split(",")
    for name in configs:
        make_config(name, "none")  # fail fast on an unknown name
    if bad := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {MODES}")
    t0, results = time.perf_counter(), {}
    for config in [] if args.no_train else configs:
        for mode in modes:
            for variant in args.variants.split(","):
                print(f"measuring {config} checkpoint={mode} {variant} ...", flush=True)
                results[(config, mode, variant)] = r = run_train(args, config, mode, variant)
                print(f"  {r['step_ms']:.0f} ms/step, {r['peak_mib']:.0f} MiB, loss {r['loss']:.3f}", flush=True)
    compare = None
    if args.compare:
        if len(configs) != 1 or len(modes) != 1:
            raise SystemExit("--compare needs exactly one config and one checkpoint mode")
        print(
            f"measuring {configs[0]} checkpoint={modes[0]}: eager against {args.compare}, alternating ...", flush=True
        )
        compare = spawn(args, "compare", configs[0], modes[0], variant=args.compare)
    sample = None
    if not args.no_sample:
        print(f"measuring narrow sample({SAMPLE_N}) against log_prob({SAMPLE_N}) ...", flush=True)
        sample = spawn(args, "sample")
    report(args, results, sample, compare)
    print(f"\nwall time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
