"""A training job's own records beside its Ray Train run, under ``<storage.path>/.flowpp/<name>/``:

    run.json       {"run": Ray Train run name}: the job's current run (``name`` until ``--new-run``)
    finished.json  {"run", "step", "finished_at"}: written by the driver once that run completed
    lock.json      {"owner", "heartbeat", "expires", "ray_job"}: held by the driver while it runs

A re-submitted job whose current run finished at or beyond ``train.max_steps`` does nothing and
says so; ``--new-run`` starts a fresh Ray Train run (a new run name, the old one kept). Two
drivers of the same job are refused by the lock, a lease of ``orchestrator.core.lease`` kept by
conditional writes: its owner renews it every ``storage.lock.heartbeat_s``; a lock whose heartbeat
is older than ``storage.lock.stale_s``, or whose owner was a process of this machine that is gone
(a killed driver), is taken over, and a holder that comes back to a lock taken over stops.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from orchestrator.config import JobSpec
from orchestrator.core import lease, storage
from orchestrator.core.errors import FlowppError, UserError

log = logging.getLogger(__name__)


class JobRunningError(UserError):
    """Another driver of the same job holds its lock; the message names it."""


class LockLostError(FlowppError):
    """This driver's lock was taken over while it was cut off; it stopped, keeping the checkpoints."""


class UnconditionalStoreError(UserError):
    """The store ignores conditional writes and the job spec refuses to run so."""


def state_url(spec: JobSpec, leaf: str) -> str:
    return storage.join(spec.storage.path, ".flowpp", spec.name, leaf)


def _read(spec: JobSpec, leaf: str) -> dict | None:
    url, opts = state_url(spec, leaf), spec.storage.options()
    if storage.object_size(url, opts) is None:
        return None
    try:
        return json.loads(storage.read_bytes(url, opts))
    except (ValueError, FileNotFoundError):
        return None  # a half-written or vanished record counts as none


def _write(spec: JobSpec, leaf: str, record: dict) -> None:
    storage.write_bytes(state_url(spec, leaf), json.dumps(record).encode(), spec.storage.options())


# -- the current run and whether it finished -----------------------------------------------
def current_run(spec: JobSpec) -> str:
    """The Ray Train run name this job resumes: ``name``, or the one the last ``--new-run`` made."""
    record = _read(spec, "run.json") or {}
    return str(record.get("run") or spec.name)


def start_new_run(spec: JobSpec) -> str:
    """A fresh run name (``name-YYYYMMDD-HHMMSS``), recorded as the job's current run."""
    run = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    _write(spec, "run.json", {"run": run})
    return run


def finished_step(spec: JobSpec, run: str) -> int | None:
    """The step at which ``run`` completed, or None if it has not."""
    record = _read(spec, "finished.json")
    if record and record.get("run") == run:
        return int(record["step"])
    return None


def mark_finished(spec: JobSpec, run: str, step: int) -> None:
    _write(spec, "finished.json", {"run": run, "step": step, "finished_at": time.time()})


# -- the lock ------------------------------------------------------------------------------
JobLock = lease.Lease  # this driver's hold on the job; ``release`` (or a ``with`` block's end) gives it back


def _refusal(spec: JobSpec, held: lease.Holder | None) -> JobRunningError:
    who = f"driver {held.owner if held else '(another one, starting at the same time)'}"
    ray_job = held.info.get("ray_job") if held else ""
    if ray_job:
        who += f", Ray job {ray_job} (stop it with `ray job stop {ray_job}`)"
    beat = f", last heartbeat {time.time() - held.beat:.0f} s ago" if held and held.beat else ""
    return JobRunningError(
        f"job {spec.name} is already running: {who}{beat}, lock {state_url(spec, 'lock.json')}; wait for it "
        f"to finish (a lock without a heartbeat for {spec.storage.lock.stale_s:g} s, storage.lock.stale_s, "
        "is taken over)"
    )


class Unlocked:
    """``--no-lock``: a stand-in for the lock that holds nothing and is never lost."""

    def __init__(self, spec: JobSpec):
        self.lost = threading.Event()
        log.warning("job %s runs without its lock (--no-lock): nothing keeps a second driver of it out", spec.name)

    def __enter__(self) -> Unlocked:
        return self

    def __exit__(self, *exc) -> None:
        return None


unlocked = Unlocked


def lock_lost(spec: JobSpec) -> LockLostError:
    return LockLostError(
        f"job {spec.name}: another driver took over its lock {state_url(spec, 'lock.json')} while this one could "
        f"not renew it for storage.lock.stale_s ({spec.storage.lock.stale_s:g} s); this driver stopped, and the "
        "checkpoints written so far are kept"
    )


def _owner_gone(held: lease.Holder) -> bool:
    """The lock's owner was a process on this machine that no longer exists (a killed driver)."""
    host, _, rest = held.owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire(spec: JobSpec, settle_s: float = 1.0, stop: Callable[[], Any] = _thread.interrupt_main) -> JobLock:
    """Hold the job's lock (the one lease of ``orchestrator.core.lease``), or raise
        ``JobRunningError`` if a live driver holds it.

        The store is probed first: where it enforces conditional writes, only one driver can take
        the lock. If it ignores them, ``storage.lock.without_conditions`` says whether to refuse
        (``UnconditionalStoreError``) or to fall back to write-settle-read with a warning. A lock lost
        while held (taken over by another driver after this one went ``storage.lock.stale_s`` without
        renewing it) stops this driver at once: ``lost`` is set, and ``stop`` is called (by default it
    interrupts the main thread, wherever it waits: Ray Train's ``fit`` then aborts the run)."""
    opts, url, cfg = spec.storage.options(), state_url(spec, "lock.json"), spec.storage.lock
    atomic = storage.honours_conditions(state_url(spec, ""), opts)
    if not atomic:
        if cfg.without_conditions == "refuse":
            raise UnconditionalStoreError(
                f"{url}: the store ignores conditional writes (If-None-Match, If-Match), so two drivers could "
                "both hold the job's lock; set storage.lock.without_conditions: settle to fall back to "
                "write, settle and read back, or pass --no-lock to run without the lock"
            )
        log.warning("%s: the store ignores conditional writes; the job's lock falls back to write, settle and "
                    "read back (storage.lock.without_conditions: settle), which narrows a race of two drivers "
                    "but does not close it", url)  # fmt: skip

    def lost(holder: lease.Holder | None) -> None:
        taker = holder.owner if holder else "(deleted)"
        log.error("job %s: its lock %s was taken over by %s while this driver could not renew it; stopping now "
                  "(the checkpoints written so far are kept)", spec.name, url, taker)  # fmt: skip
        stop()

    store = lease.JsonStore(url, opts, cfg.stale_s, atomic=atomic)
    info = {"ray_job": os.environ.get("RAY_JOB_ID", "")}
    try:
        return lease.acquire(
            store, cfg.stale_s, settle_s=settle_s, stale=_owner_gone, beat_s=cfg.heartbeat_s, info=info, on_lost=lost
        )
    except lease.LeaseHeld as held:
        raise _refusal(spec, held.holder) from None
