"""A training job's own records beside its Ray Train run, under ``<storage.path>/.flowpp/<name>/``:

    run.json       {"run": Ray Train run name}: the job's current run (``name`` until ``--new-run``)
    finished.json  {"run", "step", "finished_at"}: written by the driver once that run completed
    lock.json      {"owner", "heartbeat", "expires", "ray_job"}: held by the driver while it runs

A re-submitted job whose current run finished at or beyond ``train.max_steps`` does nothing and
says so; ``--new-run`` starts a fresh Ray Train run (a new run name, the old one kept). Two
drivers of the same job are refused by the lock, a lease of ``orchestrator.core.lease``: its
owner renews it every ``HEARTBEAT_S``; a lock whose heartbeat is older than ``STALE_S``, or
whose owner was a process of this machine that is gone (a killed driver), is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from orchestrator.config import JobSpec
from orchestrator.core import lease, storage
from orchestrator.core.errors import UserError

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 45.0


class JobRunningError(UserError):
    """Another driver of the same job holds its lock; the message names it."""


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
        f"to finish (a lock without a heartbeat for {STALE_S:.0f} s is taken over)"
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


def acquire(spec: JobSpec, settle_s: float = 1.0) -> JobLock:
    """Hold the job's lock (the one lease of ``orchestrator.core.lease``), or raise
    ``JobRunningError`` if a live driver holds it."""

    def lost(holder: lease.Holder | None) -> None:
        taker = holder.owner if holder else "(deleted)"
        log.error("job %s: its lock was taken over by %s; this driver no longer holds it", spec.name, taker)

    store = lease.JsonStore(state_url(spec, "lock.json"), spec.storage.options(), STALE_S)
    info = {"ray_job": os.environ.get("RAY_JOB_ID", "")}
    try:
        return lease.acquire(
            store, STALE_S, settle_s=settle_s, stale=_owner_gone, beat_s=HEARTBEAT_S, info=info, on_lost=lost
        )
    except lease.LeaseHeld as held:
        raise _refusal(spec, held.holder) from None
