"""The one retry helper: jittered exponential backoff within a time budget, the error
classifier passed in. Storage and every MLflow path retry through it; the MLflow queue's
background thread draws its waits from ``jitter``.

With ``grace_s`` the budget also holds within an attempt: each attempt runs on a daemon thread
that is waited for until the deadline plus ``grace_s`` at most, and then abandoned with a
``BudgetSpent`` (a hung server cannot keep a caller past its budget by more than the grace)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["BudgetSpent", "call", "jitter"]

T = TypeVar("T")


def jitter(cap: float, floor: float = 0.0) -> float:
    """A delay drawn uniformly between ``floor * cap`` and ``cap`` (0: full jitter)."""
    return random.uniform(floor * cap, cap)


class BudgetSpent(TimeoutError):
    """An attempt still ran when the budget and its grace were spent; it was abandoned."""


def _within(fn: Callable[[], T], until: float) -> T:
    """``fn()`` on a daemon thread, waited for until the monotonic time ``until`` at most."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="retry-attempt", daemon=True)
    worker.start()
    worker.join(max(0.0, until - time.monotonic()))
    if worker.is_alive():
        raise BudgetSpent("no answer within the retry budget")
    if "error" in box:
        raise box["error"]
    return box["value"]


def call(
    fn: Callable[[], T],
    *,
    budget_s: float,
    transient: Callable[[BaseException], bool],
    first_backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    floor: float = 0.0,
    on_retry: Callable[[int, float, float, BaseException], Any] | None = None,
    grace_s: float | None = None,
) -> T:
    """``fn()``, called again after each error ``transient`` accepts, until ``budget_s`` is spent.

    The wait before attempt n+1 is ``jitter(cap)``, the cap doubling from ``first_backoff_s`` to
    ``max_backoff_s``, and never past the deadline. ``on_retry(attempt, delay, left, exc)`` is
    called before each wait (to log it). A permanent error, or the last transient one once the
    budget is spent, is raised as it came. ``grace_s``: see the module; ``BudgetSpent`` then ends it.
    """
    deadline = time.monotonic() + budget_s
    cap, attempt = first_backoff_s, 0
    while True:
        attempt += 1
        try:
            return fn() if grace_s is None else _within(fn, deadline + grace_s)
        except BudgetSpent:
            raise
        except Exception as exc:
            left = deadline - time.monotonic()
            if not transient(exc) or left <= 0:
                raise
            delay = min(left, jitter(cap, floor))
            if on_retry is not None:
                on_retry(attempt, delay, left, exc)
            time.sleep(delay)
            cap = min(cap * 2, max_backoff_s)
