"""Timing a step on any device: the one ``sync`` and ``timed`` of bench/ (torch alone)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a wall-clock reading is the work's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], n: int, device: torch.device) -> tuple[list[float], object]:
    """Seconds of each of ``n`` calls of ``fn``, each between two syncs, and its last result."""
    times, out = [], None
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, out
