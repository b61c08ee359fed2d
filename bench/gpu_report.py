"""The markdown that bench/gpu_check prints and writes to $OUT after every row."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bench.gpu_plan import Config, Row
from orchestrator.training.mfu import mfu

GIB = 2**30
# Issue 13's goals for the imagenet64 preset on one H200: (label, smallest batch, largest batch, images/s).
GOALS = (("bf16 at a per-GPU batch of 64 or more", 64, None, 1100.0), ("the official per-GPU batch of 9", 9, 9, 150.0))


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


def device_lines(device: torch.device) -> list[str]:
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    if device.type != "cuda":
        return [f"device: {device} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads), {versions}"]
    props = torch.cuda.get_device_properties(device)
    return [f"device: {props.name}, {props.total_memory / GIB:.1f} GiB, {props.multi_processor_count} SMs; {versions}"]


def flops_line(flops: float | None, where: str, seconds: float) -> str:
    if not flops:
        return "FLOPs/image: not counted"
    return (f"FLOPs/image: {flops:,.0f} ({flops / 1e9:,.3f} GFLOP; model forward + backward, no recompute: "
            f"flowpp.flops.train_flops_per_image, counted on {where} in {seconds:.1f} s)")  # fmt: skip


def peak_line(peak: float | None, device_name: str, override: float | None) -> str:
    if peak is None:
        return f"MFU: - (no dense bf16 peak known for {device_name!r}; pass --peak-tflops)"
    source = "--peak-tflops" if override else f"dense bf16 peak of {device_name}"
    return f"MFU denominator: {peak / 1e12:,.0f} TFLOP/s ({source}), for fp32 rows too"


def write(path: Path | None, lines: list[str]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


def report(header: list[str], rows: list[Row], mfu_of: tuple, footer: list[str], started: float, budget_s: float):
    """The markdown the run prints and writes; ``mfu_of``: (FLOPs per image, peak FLOP/s)."""
    wall = f"wall time: {time.perf_counter() - started:.0f} s (budget {budget_s:.0f} s)"
    return [*header, "", *table(rows, *mfu_of), "", *goal_lines(rows), "", *footer, wall]


class Report:
    """The rows in plan order (pending ones marked), the footer; printed and written after each row."""

    def __init__(self, args, header: list[str], mfu_of: tuple, started: float):
        self.args, self.header, self.mfu_of, self.started = args, header, mfu_of, started
        self.rows: list[Row] = []
        self.footer: list[str] = []

    def expect(self, configs: list[Config]) -> None:
        self.rows = [Row(c, note="pending") for c in configs]
        self.flush()

    def put(self, row: Row) -> None:
        """In the first pending slot of its config, else at the end (a row timed again)."""
        slot = next((i for i, r in enumerate(self.rows) if r.config == row.config and r.note == "pending"), None)
        if slot is None:
            self.rows.append(row)
        else:
            self.rows[slot] = row
        print(table([row], *self.mfu_of)[-1], flush=True)
        self.flush()

    def note(self, line: str) -> None:
        print(line, flush=True)
        self.footer.append(line)
        self.flush()

    def done(self) -> list[Row]:
        return [r for r in self.rows if r.step_s]

    def lines(self) -> list[str]:
        return report(self.header, self.rows, self.mfu_of, self.footer, self.started, self.args.budget_s)

    def flush(self) -> None:
        write(self.args.out, self.lines())
