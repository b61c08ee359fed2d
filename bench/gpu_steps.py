"""The timed work of bench/gpu_check, shared by its main process and its compiled-row children
(bench/gpu_row.py): a row's steps, the memory probe, sampling against scoring, the EMA step."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable

import torch

from bench.gpu_plan import Config, Row
from bench.timing import sync, timed
from bench.variants import apply_variant
from flowpp import build_model, get_preset
from flowpp.compile import compile_model
from flowpp.distributed import data_dependent_init
from flowpp.ema import EMA
from orchestrator.training.step import train_step

LR, GRAD_CLIP, INIT_BATCH = 1e-4, 1.0, 2
SAMPLE_N, SAMPLE_REPEATS, EMA_ROUNDS = 16, 3, 5


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    """The caching allocator's OutOfMemoryError, or cuBLAS / cuDNN failing to get a workspace."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or any(s in str(e) for s in ("out of memory", "ALLOC_FAILED"))


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"


def setup(preset: str, config: Config, device: torch.device, backend: str = "inductor"):
    """Model (ActNorm initialised eagerly on a small batch, then compiled if the variant says so),
    Adam, and a batch of uint8 pixels on ``device``, as orchestrator.data.stream.to_device hands them."""
    torch.manual_seed(0)
    preset_cfg = get_preset(preset, checkpoint=config.mode, bf16=config.precision == "bf16")
    cfg, fused = apply_variant(preset_cfg, config.variant)
    dtype = torch.uint8 if cfg.num_levels <= 256 else torch.int64
    x = torch.randint(0, cfg.num_levels, (config.batch, *cfg.shape), dtype=dtype, device=device)
    model = build_model(cfg.replace(compile=False)).to(device)
    data_dependent_init(model, x[:INIT_BATCH])
    if cfg.compile:  # what build_model does with cfg.compile, with a choice of backend for CPU tests
        compile_model(model, cfg.compile_mode, backend)
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=LR, fused=fused or None), x


class Stepper:
    """One training step per call; counts the steps that train_step skipped (non-finite)."""

    def __init__(self, model, opt, x, step_fn=train_step):
        self.model, self.opt, self.x, self.step_fn, self.skipped = model, opt, x, step_fn, 0

    def __call__(self) -> None:
        out = self.step_fn(self.model, self.opt, self.x, lr=LR, grad_clip=GRAD_CLIP)
        self.skipped += bool(getattr(out, "skipped", out))


def run_row(preset, config: Config, warmup: int, steps: int, device, *, step_fn=train_step, backend="inductor",
            after_first: Callable[[], None] | None = None, ema: bool = False) -> tuple[Row, dict | None]:  # fmt: skip
    """(row, EMA timings or None) of ``config``: ``warmup`` untimed steps, then ``steps`` timed.

    ``after_first`` runs after the first step (a compiled row's compile): a child reports and
    waits there for its turn on the device. ``ema``: then time the step with EMA.update too."""
    started = time.perf_counter()
    model, opt, x = setup(preset, config, device, backend)
    sync(device)
    setup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = Stepper(model, opt, x, step_fn)
    warm, _ = timed(run, min(1, warmup), device)
    if after_first is not None:
        after_first()
    warm += timed(run, max(0, warmup - 1), device)[0]
    times, _ = timed(run, steps, device)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    note = f"{run.skipped} of {warmup + steps} steps skipped (non-finite)" if run.skipped else ""
    compile_s = max(0.0, warm[0] - step_s) if warm and config.compiled else None
    wall = time.perf_counter() - started
    row = Row(config, step_s, config.batch / step_s, peak, setup_s, compile_s, note, wall)
    return row, (time_ema(run, device) if ema else None)


def time_ema(run: Stepper, device: torch.device, rounds: int = EMA_ROUNDS) -> dict:
    """Medians of train_step alone, train_step + EMA(model).update(model), and the update alone,
    alternating (one untimed round first): what orchestrator/training/loop.py's loop does each step."""
    ema = EMA(run.model)
    times: dict[str, list[float]] = {"step": [], "step_ema": [], "ema": []}

    def whole() -> None:
        run()
        ema.update(run.model)

    for i in range(rounds + 1):
        for name, fn in (("step", run), ("step_ema", whole), ("ema", lambda: ema.update(run.model))):
            t, _ = timed(fn, 1, device)
            if i:
                times[name] += t
    return {name: statistics.median(values) for name, values in times.items()}


def ema_line(timing: dict | None, where: str) -> str:
    if not timing:
        return f"train_step + EMA.update ({where}): not measured"
    step, whole, update = timing["step"], timing["step_ema"], timing["ema"]
    share = f"{(whole - step) / step:+.0%}"
    return (f"train_step + EMA.update ({where}): {whole * 1e3:,.1f} ms against train_step alone {step * 1e3:,.1f} ms "
            f"({share}); EMA.update alone {update * 1e3:,.1f} ms, median of {EMA_ROUNDS}")  # fmt: skip


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
                    t, _ = timed(call, 1, device)
                    if i:
                        times[name] += t
        s_s, lp_s = statistics.median(times["sample"]), statistics.median(times["log_prob"])
    except Exception as e:  # the step table matters more
        traceback.print_exc()
        return f"sample({SAMPLE_N}): error: {first_line(e)}"
    verdict = "MET" if s_s <= lp_s else "NOT met"
    return (f"sample({SAMPLE_N}): {s_s * 1e3:,.1f} ms ({SAMPLE_N / s_s:,.1f} images/s) against log_prob({SAMPLE_N}) "
            f"{lp_s * 1e3:,.1f} ms, ratio {s_s / lp_s:.2f} (median of {SAMPLE_REPEATS}, fp32, eval) -> "
            f"goal sample <= log_prob {verdict}")  # fmt: skip


FIT = 0.9  # of the device's memory, for the largest batch: room for fragmentation and the compiled graphs' own


def probe_batch(preset: str, device: torch.device, small: int, goal: int, limit: int) -> tuple[int, str, list[str]]:
    """(largest batch up to ``limit`` that fits, the goal rows' checkpoint mode, what the probe did).

    Eager bf16 steps with ``checkpoint: none`` at ``small`` and ``goal`` give the peak's fixed
    part and its slope per image; the largest batch predicted to fit in FIT of the device's memory
    is then tried with one step, and 20% smaller on an OOM. No compile: a minute saved per guess."""
    if device.type != "cuda" or goal <= small:
        return limit, "none", [f"memory probe: not run (no CUDA, or goal batch <= {small}); largest batch {limit}"]
    total = torch.cuda.get_device_properties(device).total_memory
    model, opt, x = setup(preset, Config(limit, "bf16", "none"), device)
    run, peaks = Stepper(model, opt, x), {}
    try:
        for batch in (small, goal):
            peaks[batch] = _peak_of_step(run, x[:batch], device)
    except Exception as e:
        if not is_oom(e):
            raise
        return goal, "attention", [f"memory probe: checkpoint=none runs out of memory at batch {goal}: attention"]
    per_image = (peaks[goal] - peaks[small]) / (goal - small)
    fixed = peaks[small] - small * per_image
    # while it compiles, the goal and official rows compile beside it and the eager rows (fp32 up to
    # ``goal``, about twice the bf16 peak) run here: leave them their peaks
    beside = 3 * peaks[goal] + peaks[small]
    batch = min(limit, int((FIT * total - beside - fixed) / max(per_image, 1.0)) // 8 * 8)
    gib = {b: f"{p / 2**30:.2f} GiB" for b, p in peaks.items()}
    lines = [f"memory probe: peak {gib[small]} at batch {small}, {gib[goal]} at {goal}: {per_image / 2**20:,.0f} MiB "
             f"per image; {FIT:.0%} of {total / 2**30:.0f} GiB, less {beside / 2**30:.1f} GiB for the rows beside it, "
             f"holds {batch}"]  # fmt: skip
    while batch > goal:
        try:
            peak = _peak_of_step(run, x[:batch], device)
            lines.append(f"memory probe: batch {batch} ran, peak {peak / 2**30:.2f} GiB")
            return batch, "none", lines
        except Exception as e:
            if not is_oom(e):
                raise
            lines.append(f"memory probe: batch {batch} ran out of memory")
            free(device)
            batch = int(batch * 0.8) // 8 * 8
    return goal, "none", lines


def _peak_of_step(run: Stepper, x: torch.Tensor, device: torch.device) -> int:
    run.x = x
    torch.cuda.reset_peak_memory_stats(device)
    timed(run, 1, device)
    return torch.cuda.max_memory_allocated(device)


def ema_timing(preset: str, config: Config, device: torch.device) -> dict:
    """time_ema of a fresh model at ``config``, after one untimed step."""
    model, opt, x = setup(preset, config, device)
    run = Stepper(model, opt, x)
    timed(run, 1, device)
    return time_ema(run, device)
