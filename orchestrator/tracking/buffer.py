"""What keeps a training run going while its MLflow server is away, and says when it is.

``check_reachable`` fails a job before any worker starts when its tracking server does not
answer, naming the server (never its credentials). ``run_status_on_exit`` marks the job's
run FAILED or KILLED when the job ends that way.

``MetricBuffer`` takes metrics (and other small calls: params, text) off the training loop:
they go into a bounded queue that one background thread sends, retrying with jittered
backoff for as long as the server is down, so that a report or a checkpoint never waits on
MLflow. When the queue is full the oldest metric points are dropped (and counted); ``close``
flushes what is left, for a bounded time, at the end of the run.

``with_retries`` is the foreground counterpart for calls that must happen (registering the
model): retried with backoff until a time budget is spent. Both decide what is worth a retry
from MLflow's error code, never from the text of an error.

``SystemMetrics`` samples MLflow's system metrics (CPU, memory, disk, network, and the GPUs
NVML finds) on a daemon thread and sends them through the same queue.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from orchestrator.core import retry
from orchestrator.tracking.connection import (  # noqa: F401  (the server's availability, re-exported)
    HTTP_TIMEOUT_S,
    TrackingUnavailableError,
    check_reachable,
    client_for,
    first_line,
    public_uri,
)

log = logging.getLogger(__name__)

# error codes that mean the request itself is wrong: sending it again changes nothing
_PERMANENT = {
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "ENDPOINT_NOT_FOUND",
    "FEATURE_DISABLED",
}


def is_transient(exc: BaseException) -> bool:
    """An error a later attempt may not meet: the server unreachable, overloaded, or failing."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT
    try:
        import requests

        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    return isinstance(exc, ConnectionError | TimeoutError)


def backoff(cap: float) -> float:
    """A jittered delay below ``cap`` (at least a tenth of it)."""
    return retry.jitter(cap, floor=0.1)


def with_retries(what: str, fn: Callable[[], Any], budget_s: float, first_backoff_s: float = 1.0):
    """``fn()``, retried on transient errors with jittered exponential backoff for ``budget_s`` seconds,
    and never waited for past the budget by more than one HTTP timeout (``retry.BudgetSpent``).

    A permanent error, or the last transient one once the budget is spent, is raised as is.
    """

    def warn(attempt: int, delay: float, left: float, exc: BaseException) -> None:
        log.warning("%s: MLflow failed (attempt %d), retrying in %.1f s: %s", what, attempt, delay, first_line(exc))

    return retry.call(fn, budget_s=budget_s, transient=is_transient, first_backoff_s=first_backoff_s,
                      max_backoff_s=60.0, floor=0.1, on_retry=warn, grace_s=HTTP_TIMEOUT_S)  # fmt: skip


@dataclass
class _Op:
    what: str
    send: Callable[[], None]
    points: int = 0
    """Metric points this op carries (0 for params, text and tags, which are never dropped)."""
    done: bool = False


class MetricBuffer:
    """A bounded queue of MLflow calls and the one daemon thread that sends them in order."""

    def __init__(self, client, run_id: str, max_points: int = 10_000, first_backoff_s: float = 1.0):
        self.client, self.run_id = client, run_id
        self.max_points, self.first_backoff_s = max_points, first_backoff_s
        self.dropped = 0
        self.healthy = True
        """False from a failed send to the next good one: then nobody waits on the server."""
        self._ops: deque[_Op] = deque()
        self._points = 0
        self._inflight: _Op | None = None
        self._inflight_since = 0.0
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-buffer-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- the training loop's side: never blocks on the network --------------------------
    def metrics(self, metrics: dict, step: int, wait_s: float = 0.0) -> None:
        """Queue ``metrics``; while the server answers, wait up to ``wait_s`` for them to be sent
        (so that a run killed right after a report still has them), never while it does not."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        op = _Op(f"metrics of step {step}", lambda: self.client.log_batch(self.run_id, metrics=batch), len(batch))
        self._put(op)
        if wait_s > 0:
            self._wait(op, wait_s)

    def _wait(self, op: _Op, wait_s: float) -> None:
        """Until ``op`` is sent, the server is found unhealthy, or a send is stuck, for ``wait_s`` at
        most. A send turns stuck by the clock alone, with no notify: the wait wakes when it does
        (a report that came while the previous one's send was still young waited its whole 2 s)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while not (op.done or not self.healthy or self._stuck(wait_s)):
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    return
                if self._inflight is not None:  # wake when the send in flight turns stuck
                    left = min(left, self._inflight_since + wait_s - now + 0.001)
                self._cond.wait(timeout=max(left, 0.001))

    def _stuck(self, after_s: float) -> bool:
        """A send has been waiting on the server for more than ``after_s`` (a hung server, before its
        timeout ends the send): nobody else waits on it meanwhile."""
        return self._inflight is not None and time.monotonic() - self._inflight_since > after_s

    def call(self, what: str, send: Callable[[], None]) -> None:
        """Any other call (params, text, a tag), sent in order with the metrics."""
        self._put(_Op(what, send))

    def _put(self, op: _Op) -> None:
        with self._cond:
            self._ops.append(op)
            self._points += op.points
            while self._points > self.max_points and self._drop_oldest_metrics():
                pass
            self._cond.notify_all()

    def _drop_oldest_metrics(self) -> bool:
        victim = next((op for op in self._ops if op.points), None)
        if victim is None:
            return False
        self._ops.remove(victim)
        self._points -= victim.points
        victim.done = True
        if not self.dropped:
            log.warning("MLflow is behind: its queue holds %d metric points; dropping the oldest", self.max_points)
        self.dropped += victim.points
        return True

    def pending(self) -> int:
        """Calls not sent yet (queued or being sent)."""
        with self._cond:
            return len(self._ops) + (self._inflight is not None)

    def close(self, timeout_s: float = 60.0) -> int:
        """Send what is queued, for at most ``timeout_s``; returns the number of calls left unsent."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._ops or self._inflight) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            left = len(self._ops) + (self._inflight is not None)
        if left:
            log.warning("MLflow run %s: %d logging call(s) could not be sent and are lost", self.run_id, left)
        if self.dropped:
            log.warning("MLflow run %s: %d metric point(s) were dropped while the server was away", self.run_id,
                        self.dropped)  # fmt: skip
        return left

    # -- the background thread -----------------------------------------------------------
    def _run(self) -> None:
        cap = self.first_backoff_s
        while True:
            with self._cond:
                while not self._ops and not self._closing:
                    self._cond.wait()
                if not self._ops:
                    return
                op = self._inflight = self._ops.popleft()
                self._inflight_since = time.monotonic()
                self._points -= op.points
            try:
                op.send()
                cap, self.healthy = self.first_backoff_s, True
            except Exception as exc:  # noqa: BLE001 - a logging call never ends the run
                if is_transient(exc):
                    with self._cond:
                        self.healthy = False
                        self._ops.appendleft(op)  # first again, once the server answers
                        self._points += op.points
                        self._inflight = None
                        self._cond.notify_all()
                        self._cond.wait(timeout=backoff(cap))
                    if cap == self.first_backoff_s:
                        log.warning("MLflow unreachable, keeping %s for later: %s", op.what, first_line(exc))
                    cap = min(cap * 2, 30.0)
                    continue
                log.warning("MLflow refused %s, skipped: %s", op.what, first_line(exc))
            with self._cond:
                op.done, self._inflight = True, None
                self._cond.notify_all()


class SystemMetrics:
    """MLflow's system metrics of this machine, ``system/<name>`` every ``interval_s`` seconds, handed
    to ``send(metrics, step)`` (which queues them on a ``MetricBuffer``).

    The samples come from MLflow's own ``SystemMetricsMonitor`` (CPU, memory, disk, network, and
    each GPU that NVML finds; none on a machine without one). Its own loop is not used: it sends
    from its thread, stops for good at the first failed request and, when stopped, waits for that
    request. This thread makes no request but one, the run's start time; a sample's step is the
    whole seconds since the run started (one more than the last at least), so that a resumed run
    goes on where it stopped.
    """

    def __init__(self, client, run_id: str, send: Callable[[dict, int], None], interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.client, self.run_id, self.send, self.interval_s = client, run_id, send, interval_s
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-system-{run_id[:8]}", daemon=True)
        self._thread.start()

    def _run_start_s(self) -> float:
        try:
            return self.client.get_run(self.run_id).info.start_time / 1000
        except Exception as exc:  # noqa: BLE001 - the server away: steps count from this process's start
            log.debug("system metrics: the run's start time is unknown (%s)", first_line(exc))
            return time.time()

    def _run(self) -> None:
        monitor = self._monitor
        try:
            monitor.collect_metrics()  # the first CPU figure of psutil means nothing: a baseline
            self._clear()
            start, step = self._run_start_s(), -1
            while not self._stop.wait(self.interval_s):
                monitor.collect_metrics()
                metrics = {f"system/{k}": v for k, v in monitor.aggregate_metrics().items()}
                self._clear()
                step = max(step + 1, int(time.time() - start))
                self.send(metrics, step)
        except Exception as exc:  # noqa: BLE001 - a failing sensor never ends the run
            log.warning("system metrics stopped: %s", first_line(exc))

    def _clear(self) -> None:
        for sensor in self._monitor.monitors:
            sensor.clear_metrics()

    def stop(self, timeout_s: float = 5.0) -> None:
        """No more samples (the thread ends within ``timeout_s``, unless the run's start time is still asked)."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def run_status_on_exit(tracking_uri: str | None, run_id: str | None) -> Iterator[None]:
    """Around a job's training: its MLflow run ends FAILED if the job raises, KILLED on Ctrl-C or SIGTERM."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if main:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        end_run(tracking_uri, run_id, "KILLED")
        raise
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED")
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def end_run(tracking_uri: str | None, run_id: str | None, status: str) -> None:
    """Mark a still-running run ``status``; best effort (the server may be why the job failed)."""
    if not (tracking_uri and run_id):
        return
    try:
        check_reachable(tracking_uri, timeout_s=3.0)
        client = client_for(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - never hides the error that ended the job
        log.warning("MLflow run %s could not be marked %s: %s", run_id, status, first_line(exc))
