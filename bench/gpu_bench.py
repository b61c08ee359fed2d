"""Call 1 ("answer") of the device check: timed training steps of ``--preset`` with MFU.

Run from the repository root as ``bench/gpu_check`` (its launcher; ``--help``), after
``bench/gpu_setup`` and ``python3 -m bench.gpu_preflight`` (docs/performance.md, "On a GPU"). In order:

1. the model FLOPs per training image, counted once on the device (bench/capacity.py);
2. a memory probe: eager bf16 steps with ``checkpoint: none`` find the largest batch up to
   ``--max-batch`` that fits (bench/gpu_steps.py), without compiling anything;
3. the goal rows, bf16 compiled (``--goal-variant``) with ``checkpoint: none``: at the goal batch
   (64), at that largest batch, at the official batch (9). Each compiles in a child process
   (bench/gpu_row.py), all at once, within a window priced from bench/gpu_plan.py's priors and
   the budget; a compile that outruns it is cut ("compile over N s");
4. meanwhile, in this process: the eager rows (``--batches`` x ``--precisions`` x ``--modes``),
   ``sample(16)`` against ``log_prob(16)``, and ``train_step`` + ``EMA.update`` against
   ``train_step`` alone; as soon as the goal rows have compiled they are timed one at a time,
   alone on the device (the goal batch's child also times the step with the EMA update);
5. one eager row again with no compile running, where the budget allows: what the overlap cost.

Each row: median step time of ``--steps`` after ``--warmup``, images/s, peak
``torch.cuda.max_memory_allocated``, MFU against the device's dense bf16 peak. The markdown table
goes to ``--out`` (``$OUT/gpu_check.md`` where OUT is set) after every row.

Without CUDA, or with ``--dry-run``: the plan, each step's estimate and the total against
``--budget-s`` and ``--call-s`` (the call's ``timeout_s``), and the call at its most (setup,
preflight, all of ``--budget-s``, the stop) against ``--call-s``; exit 1 when over. ``--device cpu``
runs it on the CPU (a smoke test, with ``--preset debug``). Exit status 1 when a row raised an
error other than OOM.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import gpu_plan as gp
from bench.gpu_report import Report, device_lines, flops_line, peak_line, write
from bench.gpu_row import Group
from bench.gpu_steps import (
    GRAD_CLIP,
    LR,
    ema_line,
    ema_timing,
    first_line,
    free,
    is_oom,
    probe_batch,
    run_row,
    sample_line,
)
from bench.variants import parse_variant
from flowpp import PRESETS, get_preset
from flowpp.flops import train_flops_per_image
from orchestrator.training.mfu import peak_flops
from orchestrator.training.step import train_step

PRECISIONS = ("fp32", "bf16")
MODES = ("none", "attention", "all")
MIN_WINDOW_S = 20.0  # a compile window shorter than this is not started: the row is skipped
CALL_S = 300.0  # call 1's timeout_s (README.md, docs/performance.md): at most 5 minutes, setup included
BUDGET_S = 240.0  # bench/gpu_check's share of it: CALL_S less setup, preflight and the stop (gpu_plan.call_at_most_s)


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


def _compiled_variant(text: str) -> str:
    try:
        options = parse_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not options & {"compile", "reduce-overhead"}:
        raise argparse.ArgumentTypeError(f"{text!r}: the goal rows are compiled: include compile or reduce-overhead")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    a = p.add_argument
    a("--preset", default="imagenet64", choices=sorted(PRESETS), help="flowpp preset to time")
    a("--goal-batch", type=_positive(int), default=64, help="the first goal row's per-GPU batch")
    a("--official-batch", type=_positive(int), default=9, help="the official per-GPU batch (72 / 8)")
    a("--max-batch", type=_positive(int), default=256, help="the largest batch the memory probe tries")
    a("--goal-variant", type=_compiled_variant, default="compile+fused", help="bench/variants.py name of the goal rows")
    a("--no-goals", action="store_true", help="no goal rows (no probe, no compile): eager rows only")
    a("--batches", type=_list_of("positive ints", int), default="9,64", help="eager rows' per-GPU batches")
    a("--precisions", type=_list_of("precisions", str, PRECISIONS), default="fp32,bf16", help="eager rows")
    a(
        "--modes",
        type=_list_of("checkpoint modes", str, MODES),
        default="none,attention",
        help="eager rows' checkpoint modes",
    )
    a("--warmup", type=int, default=3, help="untimed steps per row (a compiled row's first one compiles)")
    a("--steps", type=_positive(int), default=10, help="timed steps per row (median reported)")
    a("--compile-jobs", type=_positive(int), default=3, help="goal rows that compile at once")
    a("--no-overlap", action="store_true", help="eager work waits for the compiles: cleaner, longer")
    a("--compile-backend", choices=("inductor", "aot_eager"), default="inductor", help="aot_eager: CPU tests")
    a("--budget-s", type=_positive(float), default=BUDGET_S, help="wall time of bench/gpu_check from its start")
    a("--call-s", type=_positive(float), default=CALL_S, help="the call's timeout_s: setup and preflight included")
    a("--no-sample", action="store_true", help="do not time sample(16) against log_prob(16)")
    a("--no-ema", action="store_true", help="do not time train_step + EMA.update against train_step")
    a("--no-flops", action="store_true", help="do not count FLOPs (MFU then reads -)")
    a("--peak-tflops", type=_positive(float), default=None, help="MFU denominator; None: by device name")
    a("--dry-run", action="store_true", help="print the priced plan (on CPU), run nothing")
    a("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda, else a dry run")
    a("--threads", type=_positive(int), default=1, help="torch CPU threads for CPU work (dry run, cpu)")
    default_out = os.path.join(os.environ["OUT"], "gpu_check.md") if os.environ.get("OUT") else None
    a("--out", type=Path, default=default_out, help="also write the table here; $OUT/gpu_check.md where OUT is set")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error(f"argument --warmup: {args.warmup}: must be 1 or more (a compiled row's first step compiles)")
    return args


def make_plan(args: argparse.Namespace, max_batch: int | None = None, goal_mode: str = "none") -> gp.Plan:
    """The plan; ``max_batch`` None: before the probe (the largest batch's row reads ``<=``)."""
    found = max_batch
    max_batch = args.max_batch if found is None else found
    goals = [] if args.no_goals else gp.goal_rows(max_batch, args.goal_batch, args.official_batch, args.goal_variant)
    goals = [dataclasses.replace(c, mode=goal_mode, batch=c.batch or found or gp.MAX_BATCH) for c in goals]
    return gp.Plan(args.preset, goals, gp.eager_rows(args.batches, args.precisions, args.modes), max_batch,
                   args.goal_batch, args.official_batch, args.warmup + args.steps, args.compile_jobs,
                   not args.no_overlap, not args.no_sample, not args.no_ema)  # fmt: skip


# -- the run ----------------------------------------------------------------------------------
def count(preset: str, device: torch.device) -> tuple[float | None, str]:
    """The preset's model FLOPs per training image, and the footer line that states them."""
    print(f"counting FLOPs of preset {preset} on {device} ...", flush=True)
    started = time.perf_counter()
    try:
        flops = train_flops_per_image(get_preset(preset), device)  # as the trainer's log line counts them
    except Exception:  # MFU then prints "-"; the timings still matter
        traceback.print_exc()
        flops = None
    free(device)
    return flops, flops_line(flops, str(device), time.perf_counter() - started)


def probe(args, device: torch.device, rep: Report) -> gp.Plan:
    """The plan with the largest batch that fits and the goal rows' checkpoint mode, from the probe."""
    try:
        batch, mode, lines = probe_batch(args.preset, device, args.official_batch, args.goal_batch, args.max_batch)
    except Exception as e:
        traceback.print_exc()
        batch, mode, lines = args.goal_batch, "none", [f"memory probe: error: {first_line(e)}; no larger batch tried"]
    free(device)
    for line in lines:
        rep.note(line)
    resolved = make_plan(args, batch, mode)
    why = "no recomputed forward, and it fits" if mode == "none" else "none ran out of memory at the goal batch"
    rep.note(f"goal rows: checkpoint={mode} ({why}), {args.goal_variant}, largest batch {batch}")
    return resolved


class Runner:
    """One run of the plan within the budget: the compile group in flight, the rows as they come."""

    def __init__(self, plan: gp.Plan, args, device: torch.device, deadline: float, rep: Report, step_fn):
        self.plan, self.args, self.device, self.deadline = plan, args, device, deadline
        self.rep, self.step_fn = rep, step_fn
        self.group: Group | None = None
        self.ok = True

    def run(self) -> bool:
        groups = self.plan.groups()
        if groups:
            self.group = self.start(groups[0], first=True)
            if not self.plan.overlap:
                self.drain()
        for config in self.plan.eager:
            self.poll()
            self.eager(config)
        self.poll()
        self.tail()
        self.drain()
        for group in groups[1:]:
            self.group = self.start(group, first=False)
            self.drain()
        self.again()
        return self.ok

    def left(self) -> float:
        """Seconds to the deadline, less the timed steps of rows compiling now."""
        pending = self.group.configs if self.group and not self.group.drained else []
        return self.deadline - time.perf_counter() - sum(self.plan.row_s(c, self.rep.done()) for c in pending)

    # -- compiled rows, in child processes
    def start(self, configs: list[gp.Config], first: bool) -> Group | None:
        done = self.rep.done()
        estimate = gp.compile_window_s(len(configs), done, self.plan.prior)
        reserve = sum(self.plan.row_s(c, done) for c in configs)
        if first and not self.plan.overlap:
            reserve += self.plan.eager_work_s(done)
        window = min(gp.HEADROOM * estimate, self.deadline - time.perf_counter() - reserve)
        if window < MIN_WINDOW_S:
            for c in configs:
                self.rep.put(
                    gp.Row(
                        c, note=f"skipped: budget ({max(window, 0):.0f} s left to compile, ~{estimate:.0f} s needed)"
                    )
                )
            return None
        self.rep.note(f"compiling {len(configs)} goal row(s) at once, each in a child process: window {window:.0f} s "
                      f"(estimate {estimate:.0f} s)")  # fmt: skip
        return Group(configs, [self.spec(c) for c in configs], window)

    def spec(self, config: gp.Config) -> dict:
        a = self.args
        threads = a.threads if self.device.type == "cpu" else 0
        ema = not a.no_ema and config.batch == a.goal_batch
        return {"preset": a.preset, "warmup": a.warmup, "steps": a.steps, "device": str(self.device),
                "backend": a.compile_backend, "threads": threads, "ema": ema}  # fmt: skip

    def poll(self) -> None:
        if self.group is not None and self.group.ready():
            self.drain()

    def drain(self) -> None:
        group, self.group = self.group, None
        if group is None:
            return
        timeout = 30.0 + 6 * max(self.plan.row_s(c, self.rep.done()) for c in group.configs)
        for row, ema in group.rows(timeout):
            self.rep.put(row)
            if ema:
                self.rep.note(ema_line(ema, f"{row.config.label()}, in its child"))

    # -- eager work, in this process
    def eager(self, config: gp.Config, note: str = "") -> None:
        need, left = self.plan.row_s(config, self.rep.done()), self.left()
        if need > left:
            row = gp.Row(config, note=f"skipped: budget ({max(left, 0):.0f} s left, ~{need:.0f} s needed)")
        else:
            row = self.measure(config)
            row.note = row.note or (note if row.step_s else row.note)
        free(self.device)  # after measure returned: an exception's frames, and the model in them, are gone
        self.rep.put(row)

    def measure(self, config: gp.Config) -> gp.Row:
        a = self.args
        try:
            return run_row(a.preset, config, a.warmup, a.steps, self.device, step_fn=self.step_fn)[0]
        except Exception as e:  # one broken row must not cost the others' device time
            if is_oom(e):
                return gp.Row(config, note="OOM")
            traceback.print_exc()
            self.ok = False
            return gp.Row(config, note=f"error: {first_line(e)}")

    def tail(self) -> None:
        items, a = self.plan.items(), self.args
        if self.plan.sample:
            self.item(items["sample"], lambda: sample_line(a.preset, self.device))
        self.poll()
        mode = self.plan.goals[0].mode if self.plan.goals else "none"
        config = gp.Config(a.goal_batch, "bf16", mode)
        if self.plan.ema:
            self.item(items["ema"], lambda: self.ema(config))

    def item(self, item: gp.Item, make_line) -> None:
        if item.seconds > self.left():
            self.rep.note(
                f"{item.name}: skipped: budget ({max(self.left(), 0):.0f} s left, ~{item.seconds:.0f} s needed)"
            )
            return
        self.rep.note(make_line())
        free(self.device)

    def ema(self, config: gp.Config) -> str:
        where = f"{config.label()}, here"
        try:
            return ema_line(ema_timing(self.args.preset, config, self.device), where)
        except Exception as e:
            traceback.print_exc()
            return f"train_step + EMA.update ({where}): error: {first_line(e)}"

    def again(self) -> None:
        """The goal batch's bf16 eager row once more, with no compile running: what the overlap cost it."""
        if not (self.plan.overlap and self.plan.goals):
            return
        config = next((c for c in self.plan.eager if c.batch == self.args.goal_batch and c.precision == "bf16"), None)
        if config is not None and self.plan.row_s(config, self.rep.done()) <= self.left():
            self.eager(config, note="again, no compile running")


def about_lines(args, step_fn) -> list[str]:
    step = "orchestrator.training.step.train_step" if step_fn is None else "the step function passed in"
    return [
        f"step: {step}; Adam, lr {LR}, grad clip {GRAD_CLIP}, uint8 pixels; median of {args.steps} timed steps "
        f"after {args.warmup} warm-up; peak GiB: max_memory_allocated over them (weights, grads, Adam, activations)",
        f"fp32 rows: torch defaults (float32 matmul precision {torch.get_float32_matmul_precision()!r}, cuDNN TF32 "
        f"convolutions {torch.backends.cudnn.allow_tf32}); bf16 rows: the preset's bf16=True (nets under autocast)",
        f"compiled rows: {args.compile_backend}, {args.compile_jobs} at once, inductor cache shared by the rows; eager "
        f"rows {'while they compile' if not args.no_overlap else 'after them'}",
    ]


def bench(args: argparse.Namespace, device: torch.device, started: float, step_fn=None) -> int:
    """The benchmark on ``device``; 1 when a row raised an error other than OOM."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = [f"# bench/gpu_check: preset {args.preset}", *device_lines(device)]
    print("\n".join(header), flush=True)
    flops, flops_text = (None, "FLOPs/image: not counted (--no-flops)") if args.no_flops else count(args.preset, device)
    peak = peak_flops(name, args.peak_tflops)
    rep = Report(args, header, (flops, peak), started)
    for line in [flops_text, peak_line(peak, name, args.peak_tflops), *about_lines(args, step_fn)]:
        rep.note(line)
    plan = make_plan(args)
    if plan.goals:
        plan = probe(args, device, rep)
    rep.expect(plan.goals + plan.eager)
    ok = Runner(plan, args, device, started + args.budget_s, rep, step_fn or train_step).run()
    print("\n" + "\n".join(rep.lines()), flush=True)
    rep.flush()
    return 0 if ok else 1


def dry_run(args: argparse.Namespace, reason: str) -> int:
    """The priced plan; 1 when it does not fit its budget or the call's."""
    lines = [f"# bench/gpu_check: {reason}", *device_lines(torch.device("cpu"))]
    budget, fits = gp.budget_lines(make_plan(args), args.budget_s, args.call_s)
    lines += budget
    print("\n".join(lines), flush=True)
    if not args.no_flops:
        lines.append(count(args.preset, torch.device("cpu"))[1])
        print(lines[-1])
    write(args.out, lines)
    return 0 if fits else 1


def main(argv=None, started: float | None = None) -> int:
    """``started``: when the launcher started (time.perf_counter), before torch was imported; the
    budget counts from there."""
    started = time.perf_counter() if started is None else started
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
