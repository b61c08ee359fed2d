"""The log line's figures: running sums between two log lines (``Meter``), and the ETA's text."""

from __future__ import annotations

import math
import time

import torch

from orchestrator.training.mfu import mfu
from orchestrator.training.step import StepResult, all_sum

__all__ = ["Meter", "eta_text"]


def eta_text(seconds: float) -> str:
    """``HH:MM:SS``, or days (``4.3 days``) from 24 hours on; ``?`` while unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


class Meter:
    """Running sums between two log lines (loss, grad norm, images, time spent waiting for data),
    and the figures of the line: rate, MFU, peak GPU memory, the loader's share, the ETA.

    ``flush`` runs on every rank at the same steps: it sums the loader wait and the substituted
    samples over the ranks (one small all-reduce).
    """

    def __init__(self, step: int, world: int, device: torch.device, usage: tuple = (None, None), accum: int = 1):
        self.started, self.first_step = time.perf_counter(), step
        self.world, self.device, self.accum = world, device, accum
        self.flops_per_image, self.peak = usage
        self.consecutive_skips = 0
        self._reset(self.started)

    def _reset(self, now: float) -> None:
        self.loss, self.grad_norm, self.count, self.images, self.since = 0.0, 0.0, 0, 0, now
        self.data_wait = 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def add(self, out: StepResult) -> None:
        self.loss += out.loss
        self.grad_norm += out.grad_norm
        self.count += 1

    def flush(self, lr: float, stats: dict, substituted: int = 0) -> dict:
        wait, subst = all_sum([self.data_wait, float(substituted)], self.device)
        now, n = time.perf_counter(), max(1, self.count)
        elapsed = max(1e-9, now - self.since)
        images_s = self.images / elapsed
        metrics = {
            "train_bpd": self.loss / n,
            "grad_norm": self.grad_norm / n,
            "images_per_s": images_s,
            "lr": lr,
            "nonfinite_skipped": stats.get("nonfinite_skipped", 0),
            "data_wait_pct": 100.0 * wait / (self.world * elapsed),
            "substituted_samples": int(subst),
            "world_size": self.world,
            "accum_steps": self.accum,
        }
        if "upload_wait_s" in stats:  # asynchronous checkpoint uploads: what the steps waited for them, in all
            metrics["upload_wait_s"] = stats["upload_wait_s"]
        utilisation = mfu(self.flops_per_image, images_s / self.world, self.peak)
        if utilisation is not None:
            metrics["mfu_pct"] = 100.0 * utilisation
        if self.device.type == "cuda":
            metrics["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._reset(now)
        return metrics

    def eta_s(self, step: int, max_steps: int) -> float:
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
        return (max_steps - step) / rate if rate > 0 else float("inf")

    def line(self, step: int, max_steps: int, metrics: dict) -> str:
        parts = [
            f"step {step}/{max_steps}",
            f"bits/dim {metrics['train_bpd']:.4f}",
            f"images/s {metrics['images_per_s']:,.1f}",
            f"lr {metrics['lr']:.2e}",
            f"grad_norm {metrics['grad_norm']:.3f}",
        ]
        if "mfu_pct" in metrics:
            parts.append(f"mfu {metrics['mfu_pct']:.1f}%")
        if "gpu_mem_peak_gib" in metrics:
            parts.append(f"gpu_mem {metrics['gpu_mem_peak_gib']:.1f} GiB")
        parts.append(f"world {metrics['world_size']} x accum {metrics['accum_steps']}")
        parts.append(f"data_wait {metrics['data_wait_pct']:.1f}%")
        parts.append(f"substituted {metrics['substituted_samples']}")
        parts.append(f"eta {eta_text(self.eta_s(step, max_steps))}")
        return "  ".join(parts)
