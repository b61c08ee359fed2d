"""The one script to run when a GPU machine is lent: gpu tests, then timed training steps with MFU.

Run from the repository root as ``bench/gpu_check`` (its launcher; ``--help``). In order: the
device; the gpu-marked tests in a subprocess with a timeout (a failure is recorded, the rest goes
on); the model FLOPs per training image of ``--preset``, counted once on the device by
bench/capacity.py's ``count_flops`` (forward + backward, no checkpoint recompute); then for every
(batch, precision, checkpoint mode), official setting first (per-GPU batch 9 = 72 / 8,
checkpoint=attention), ``--steps`` timed after ``--warmup`` steps of orchestrator/train.py's
``train_step`` on one device (no DDP): median step time, images/s, peak
``torch.cuda.max_memory_allocated`` and MFU, the FLOPs x images/s over the device's dense bf16
peak (for fp32 rows too). A config that runs out of memory prints ``OOM``; configs that would end
past ``--budget-s`` (wall time from the start, tests included) are skipped. One markdown table,
also written to ``--out`` (``$OUT/gpu_check.md`` where OUT is set) after every config.

Without CUDA, or with ``--dry-run``: the plan and the FLOPs counted on the CPU, exit 0.
``--device cpu`` runs it all on the CPU (a smoke test, with ``--preset debug``). Exit status 1
when the gpu tests failed or a config raised an error other than running out of memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.capacity import count_flops
from bench.variants import apply_variant, parse_variant
from flowpp import PRESETS, build_model, get_preset
from flowpp.distributed import data_dependent_init
from orchestrator.step import train_step
from orchestrator.usage import mfu, peak_flops  # noqa: F401  (the MFU of the table; re-exported for tests)

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
PRECISIONS = ("fp32", "bf16")
MODES = ("none", "attention", "all")
OFFICIAL_MODE = "attention"  # the official batch's checkpoint mode: its rows run first
LR, GRAD_CLIP, INIT_BATCH = 1e-4, 1.0, 2


@dataclass(frozen=True)
class Config:
    batch: int
    precision: str
    mode: str
    variant: str = "eager"
    """bench/variants.py: eager, or compile / reduce-overhead / fused / channels_last joined by +."""


@dataclass
class Row:
    config: Config
    step_s: float | None = None
    images_s: float | None = None
    peak_bytes: int | None = None
    setup_s: float = 0.0
    compile_s: float | None = None  # a compiled variant's first step less a steady one
    note: str = ""  # OOM, error, skipped: shown in place of the step time


# -- arguments ------------------------------------------------------------------------------
def _list_of(kind: str, parse, allowed=None):
    """An argparse type: a comma list whose items ``parse`` accepts (and lie in ``allowed``)."""

    def convert(text: str):
        try:
            items = [parse(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            items = None
        if not items or (allowed is not None and any(i not in allowed for i in items)):
            choices = f" from {', '.join(allowed)}" if allowed else ""
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {kind}{choices}")
        if parse is int and min(items) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be positive")
        return items

    return convert


def _positive(parse):
    def convert(text: str):
        value = parse(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
        return value

    return convert


def _variants(text: str) -> list[str]:
    """An argparse type: a comma list of bench/variants.py names."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one variant")
    for item in items:
        try:
            parse_variant(item)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/gpu_check",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="imagenet64", choices=sorted(PRESETS), help="flowpp preset to time")
    p.add_argument("--batches", type=_list_of("positive ints", int), default="9,64", help="per-GPU batches")
    p.add_argument("--precisions", type=_list_of("precisions", str, PRECISIONS), default="fp32,bf16", help="fp32, bf16")
    p.add_argument(
        "--modes", type=_list_of("checkpoint modes", str, MODES), default="attention", help="none, attention, all"
    )
    p.add_argument(
        "--variants", type=_variants, default="eager,compile+fused", help="bench/variants.py names, e.g. compile+fused"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per config")
    p.add_argument("--steps", type=_positive(int), default=10, help="timed steps per config (median reported)")
    p.add_argument("--budget-s", type=_positive(float), default=420.0, help="wall time from start, tests included")
    p.add_argument("--tests-timeout", type=_positive(float), default=300.0, help="seconds for the gpu tests")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    p.add_argument("--no-sample", action="store_true", help="do not time sample(16) against log_prob(16)")
    p.add_argument("--peak-tflops", type=_positive(float), default=None, help="MFU denominator; None: by device name")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the FLOPs (on CPU), run nothing")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda, else a dry run")
    p.add_argument("--threads", type=_positive(int), default=1, help="torch CPU threads for CPU work (dry run, cpu)")
    default_out = os.path.join(os.environ["OUT"], "gpu_check.md") if os.environ.get("OUT") else None
    p.add_argument(
        "--out", type=Path, default=default_out, help="also write the table here; $OUT/gpu_check.md where OUT is set"
    )
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error(f"argument --warmup: {args.warmup}: must be 0 or more")
    return args


def plan(args: argparse.Namespace) -> list[Config]:
    """Every config, the official mode's rows first within each batch, batches as given."""
    variants = getattr(args, "variants", ["eager"])
    configs = [Config(b, p, m, v) for b in args.batches for m in args.modes for v in variants for p in args.precisions]
    return sorted(configs, key=lambda c: (args.batches.index(c.batch), c.mode != OFFICIAL_MODE))


# -- the gpu tests ----------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    """Test files that mention the gpu mark: collecting only these keeps the modules of other
    tests (Ray, MLflow, moto) from being imported on a machine that lacks them."""
    files = sorted(ROOT.glob("tests/**/test_*.py"))
    return [str(f.relative_to(ROOT)) for f in files if re.search(r"mark\.gpu\b", f.read_text())]


def run_gpu_tests(timeout: float, log_path: Path | None) -> tuple[bool, str]:
    """(passed, one-line result) of ``pytest -m gpu``, its output streamed as it comes."""
    files = gpu_test_files()
    if not files:
        return True, "no test file mentions the gpu mark: nothing run"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    print("$ " + " ".join(["python", *cmd[1:]]), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    lines: deque[str] = deque(maxlen=5000)
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: pytest and anything it started
        proc.wait()
        rc = None
    pump.join(timeout=5)
    if log_path is not None:
        log_path.write_text("\n".join(lines) + "\n")
    pattern = r"\d+ (passed|failed|errors?|skipped|deselected)\b|no tests ran"
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(pattern, ln)), "")
    if rc is None:
        return False, f"TIMED OUT after {timeout:.0f} s; {summary or 'no summary'}"
    verdict = {0: "PASS", 5: "NONE SELECTED"}.get(rc, f"FAIL (exit {rc})")
    return rc in (0, 5), f"{verdict}: {summary or 'no summary line'}"


def _pump(stream, lines: deque) -> None:
    for line in stream:
        print("  | " + line, end="", flush=True)
        lines.append(line.rstrip("\n"))


# -- the timed steps --------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(preset: str, config: Config, device: torch.device):
    """Model (ActNorm initialised on a small batch), Adam, and a batch of pixels on ``device``.

    uint8 pixels, as orchestrator.data.stream.to_device hands them to train_step.
    """
    torch.manual_seed(0)
    cfg, fused = apply_variant(
        get_preset(preset, checkpoint=config.mode, bf16=config.precision == "bf16"), config.variant
    )
    dtype = torch.uint8 if cfg.num_levels <= 256 else torch.int64
    x = torch.randint(0, cfg.num_levels, (config.batch, *cfg.shape), dtype=dtype, device=device)
    model = build_model(cfg).to(device)
    data_dependent_init(model, x[:INIT_BATCH])
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=LR, fused=fused or None), x


def measure(preset: str, config: Config, args: argparse.Namespace, device: torch.device, step_fn) -> Row:
    started = time.perf_counter()
    model, opt, x = setup(preset, config, device)
    sync(device)
    setup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> bool:
        out = step_fn(model, opt, x, lr=LR, grad_clip=GRAD_CLIP)
        return bool(getattr(out, "skipped", out))

    warm = []
    for _ in range(args.warmup):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        warm.append(time.perf_counter() - t0)
    times, skipped = [], 0
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        skipped += step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    note = f"{skipped} of {args.steps} steps skipped (non-finite)" if skipped else ""
    compile_s = max(0.0, warm[0] - step_s) if warm and model.config.compile else None
    return Row(config, step_s, config.batch / step_s, peak, setup_s, note=note, compile_s=compile_s)


SAMPLE_N, SAMPLE_REPEATS = 16, 3


def sample_line(preset: str, device: torch.device) -> str:
    """``sample(16)`` against ``log_prob`` of 16 images (eval, no grad, fp32, alternating, after one
    untimed call of each): sampling inverts the main flow once and should cost no more than scoring."""
    try:
        torch.manual_seed(0)
        cfg = get_preset(preset)
        x = torch.randint(0, cfg.num_levels, (SAMPLE_N, *cfg.shape), dtype=torch.uint8, device=device)
        model = build_model(cfg).to(device)
        data_dependent_init(model, x[:INIT_BATCH])
        model.eval()
        times: dict[str, list[float]] = {"sample": [], "log_prob": []}
        calls = {"sample": lambda: model.sample(SAMPLE_N), "log_prob": lambda: model.log_prob(x)}
        with torch.no_grad():
            for i in range(SAMPLE_REPEATS + 1):
                for name, call in calls.items():
                    sync(device)
                    t0 = time.perf_counter()
                    call()
                    sync(device)
                    if i:
                        times[name].append(time.perf_counter() - t0)
        s_s, lp_s = statistics.median(times["sample"]), statistics.median(times["log_prob"])
    except Exception as e:  # the step table matters more
        traceback.print_exc()
        return f"sample({SAMPLE_N}): error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
    verdict = "MET" if s_s <= lp_s else "NOT met"
    return (f"sample({SAMPLE_N}): {s_s * 1e3:,.1f} ms ({SAMPLE_N / s_s:,.1f} images/s) against log_prob({SAMPLE_N}) "
            f"{lp_s * 1e3:,.1f} ms, ratio {s_s / lp_s:.2f} (median of {SAMPLE_REPEATS}, fp32, eval) -> "
            f"goal sample <= log_prob {verdict}")  # fmt: skip


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def estimate_s(config: Config, done: list[Row], args: argparse.Namespace) -> float:
    """Seconds ``config`` should take, from the slowest per-image step at the largest batch timed
    so far (an upper bound where a larger batch costs no more per image); 0 before any."""
    timed = [r for r in done if r.step_s]
    if not timed:
        return 0.0
    largest = max(r.config.batch for r in timed)
    per_image = max(r.step_s / largest for r in timed if r.config.batch == largest)
    return max(r.setup_s for r in timed) + (args.warmup + args.steps) * per_image * config.batch


def run_config(config: Config, done: list[Row], args, device, step_fn, deadline: float) -> tuple[Row, bool]:
    """(row, ok) of one config: measured, OOM, skipped for the budget, or an error (not ok)."""
    left, need = deadline - time.perf_counter(), estimate_s(config, done, args)
    if left <= 0 or need > left:
        return Row(config, note=f"skipped: budget ({max(left, 0):.0f} s left, ~{need:.0f} s needed)"), True
    try:
        return measure(args.preset, config, args, device, step_fn), True
    except Exception as e:  # one broken config must not cost the others' device time
        if is_oom(e):
            return Row(config, note="OOM"), True
        traceback.print_exc()
        first_line = (str(e).splitlines() or [""])[0][:80]
        return Row(config, note=f"error: {type(e).__name__}: {first_line}"), False


def is_oom(e: BaseException) -> bool:
    """The caching allocator's OutOfMemoryError, or cuBLAS / cuDNN failing to get a workspace."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or any(s in str(e) for s in ("out of memory", "ALLOC_FAILED"))


# -- report -----------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row], flops_per_image: float | None, peak: float | None) -> list[str]:
    lines = [
        "| batch | precision | checkpoint | variant | step ms | images/s | peak GiB | MFU % | compile s |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, m = r.config, mfu(flops_per_image, r.images_s, peak)
        step = r.note if r.step_s is None else f"{r.step_s * 1e3:,.1f}" + (f" ({r.note})" if r.note else "")
        peak_gib = None if r.peak_bytes is None else r.peak_bytes / GIB
        mfu_pct = None if m is None else 100 * m
        cells = [str(c.batch), c.precision, c.mode, c.variant, step]
        cells += [_fmt(r.images_s, ",.1f"), _fmt(peak_gib, ".2f"), _fmt(mfu_pct, ".2f"), _fmt(r.compile_s, ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def device_lines(device: torch.device) -> list[str]:
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    if device.type != "cuda":
        return [f"device: {device} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads), {versions}"]
    props = torch.cuda.get_device_properties(device)
    return [f"device: {props.name}, {props.total_memory / GIB:.1f} GiB, {props.multi_processor_count} SMs; {versions}"]


def flops_line(flops: float | None, where: str, seconds: float) -> str:
    if not flops:
        return "FLOPs/image: not counted"
    return (f"FLOPs/image: {flops:,.0f} ({flops / 1e9:,.3f} GFLOP; model forward + backward, no checkpoint "
            f"recompute; counted on {where} in {seconds:.1f} s)")  # fmt: skip


def peak_line(peak: float | None, device_name: str, override: float | None) -> str:
    if peak is None:
        return f"MFU: - (no dense bf16 peak known for {device_name!r}; pass --peak-tflops)"
    source = "--peak-tflops" if override else f"dense bf16 peak of {device_name}"
    return f"MFU denominator: {peak / 1e12:,.0f} TFLOP/s ({source}), for fp32 rows too"


def write(path: Path | None, lines: list[str]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


# Issue 13's goals for the imagenet64 preset on one H200: (label, smallest batch, largest batch, images/s).
GOALS = (("bf16 at a per-GPU batch of 64 or more", 64, None, 1100.0), ("the official per-GPU batch of 9", 9, 9, 150.0))


def goal_lines(rows: list[Row]) -> list[str]:
    """Each goal against the fastest row that qualifies (bf16 for the first), MET or NOT met."""
    lines = []
    for label, lo, hi, target in GOALS:
        fits = [r for r in rows if r.images_s and lo <= r.config.batch <= (hi or r.config.batch)]
        if label.startswith("bf16"):
            fits = [r for r in fits if r.config.precision == "bf16"]
        if not fits:
            lines.append(f"- goal {label}: >= {target:,.0f} images/s -> not measured")
            continue
        best = max(fits, key=lambda r: r.images_s or 0.0)
        c, met = best.config, (best.images_s or 0.0) >= target
        where = f"batch {c.batch} {c.precision} checkpoint={c.mode} {c.variant}"
        lines.append(f"- goal {label}: >= {target:,.0f} images/s; best {best.images_s:,.1f} ({where}) -> "
                     f"{'MET' if met else 'NOT met'}")  # fmt: skip
    return lines


def report(header: list[str], rows: list[Row], mfu_of: tuple, footer: list[str], started: float, budget_s: float):
    """The markdown the run prints and writes; ``mfu_of``: (FLOPs per image, peak FLOP/s)."""
    wall = f"wall time: {time.perf_counter() - started:.0f} s (budget {budget_s:.0f} s, tests included)"
    return [*header, "", *table(rows, *mfu_of), "", *goal_lines(rows), "", *footer, wall]


# -- main -------------------------------------------------------------------------------------
def count(preset: str, device: torch.device) -> tuple[float | None, str]:
    """The preset's model FLOPs per training image, and the footer line that states them."""
    print(f"counting FLOPs of preset {preset} on {device} ...", flush=True)
    started = time.perf_counter()
    try:
        flops = float(count_flops("none", preset=preset, device=device)["step"])
    except Exception:  # MFU then prints "-"; the timings still matter
        traceback.print_exc()
        flops = None
    free(device)
    return flops, flops_line(flops, str(device), time.perf_counter() - started)


def tests_plan(args: argparse.Namespace) -> str:
    if args.skip_tests:
        return "gpu tests: skipped (--skip-tests)"
    files = gpu_test_files()
    return f"gpu tests: pytest -m gpu on {len(files)} file(s) {files}, timeout {args.tests_timeout:.0f} s"


def dry_run(args: argparse.Namespace, reason: str) -> int:
    configs = plan(args)
    steps = f"{args.warmup} warm-up + {args.steps} timed steps each"
    budget = f"budget {args.budget_s:.0f} s from the start (tests included)"
    lines = [f"# bench/gpu_check: {reason}", *device_lines(torch.device("cpu"))]
    lines.append(f"plan: {len(configs)} configurations of preset {args.preset}, in this order, {steps}, {budget}:")
    lines += [
        f"  {i:2d}. batch {c.batch} {c.precision} checkpoint={c.mode} {c.variant}" for i, c in enumerate(configs, 1)
    ]
    lines.append(tests_plan(args))
    print("\n".join(lines), flush=True)
    _, flops_text = count(args.preset, torch.device("cpu"))
    print(flops_text)
    write(args.out, [*lines, flops_text])
    return 0


def bench(args: argparse.Namespace, device: torch.device, started: float, step_fn=None) -> int:
    """The benchmark on ``device``; 1 when the gpu tests failed or a config raised an error."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = [f"# bench/gpu_check: preset {args.preset}", *device_lines(device)]
    print("\n".join(header), flush=True)
    tests_ok, tests_line = True, tests_plan(args)
    if not args.skip_tests:
        log = args.out.with_name(args.out.stem + "_tests.log") if args.out else None
        tests_ok, result = run_gpu_tests(args.tests_timeout, log)
        tests_line = f"gpu tests: {result}"
    print(tests_line, flush=True)
    step_name = "the step function passed in"
    if step_fn is None:
        step_fn, step_name = train_step, "orchestrator.step.train_step"
    flops, flops_text = count(args.preset, device)
    peak = peak_flops(name, args.peak_tflops)
    footer = [
        flops_text,
        peak_line(peak, name, args.peak_tflops),
        f"step: {step_name}; Adam, lr {LR}, grad clip {GRAD_CLIP}, uint8 pixels; median of {args.steps} timed steps "
        f"after {args.warmup} warm-up; peak GiB: max_memory_allocated over them (weights, grads, Adam, activations)",
        f"fp32 rows: torch defaults (float32 matmul precision {torch.get_float32_matmul_precision()!r}, cuDNN TF32 "
        f"convolutions {torch.backends.cudnn.allow_tf32}); bf16 rows: the preset's bf16=True (nets under autocast)",
        tests_line,
    ]
    if not args.no_sample:
        footer.append(sample_line(args.preset, device))
        print(footer[-1], flush=True)
        free(device)
    rows: list[Row] = []
    ok, deadline = tests_ok, started + args.budget_s
    for config in plan(args):
        row, fine = run_config(config, rows, args, device, step_fn, deadline)
        free(device)  # after run_config returned: an exception's frames, and the model in them, are gone
        rows.append(row)
        ok = ok and fine
        print(table([row], flops, peak)[-1], flush=True)
        write(args.out, report(header, rows, (flops, peak), footer, started, args.budget_s))
    lines = report(header, rows, (flops, peak), footer, started, args.budget_s)
    print("\n" + "\n".join(lines), flush=True)
    write(args.out, lines)
    return 0 if ok else 1


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda and not args.dry_run:
        print("bench/gpu_check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.dry_run or not cuda or args.device == "cpu":
        torch.set_num_threads(args.threads)  # OpenMP threads that share cores with other work slow ops 10-50x
    if args.dry_run or (args.device == "auto" and not cuda):
        return dry_run(args, "dry run" if args.dry_run else "no CUDA device: dry run")
    return bench(args, torch.device("cpu" if args.device == "cpu" else "cuda"), started)
