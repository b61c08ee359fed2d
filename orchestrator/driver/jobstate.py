"""A training job's own records beside its Ray Train run, under ``<storage.path>/.flowpp/<name>/``:

    run.json       {"run": Ray Train run name}: the job's current run (``name`` until ``--new-run``)
    finished.json  {"run", "step", "finished_at"}: written by the driver once that run completed
    lock.json      {"owner", "heartbeat", "ray_job"}: held by the driver while it runs

A re-submitted job whose current run finished at or beyond ``train.max_steps`` does nothing and
says so; ``--new-run`` starts a fresh Ray Train run (a new run name, the old one kept). Two
drivers of the same job are refused by the lock: its owner rewrites its heartbeat every
``HEARTBEAT_S``; a lock whose heartbeat is older than ``STALE_S``, or whose owner was a process
of this machine that is gone (a killed driver), is taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from orchestrator.config import JobSpec
from orchestrator.core import storage
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


def _delete(spec: JobSpec, leaf: str) -> None:
    fs, path = storage.filesystem(state_url(spec, leaf), spec.storage.options())
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


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
@dataclass
class JobLock:
    """This driver's hold on the job; ``release`` (or a ``with`` block's end) gives it back."""

    spec: JobSpec
    owner: str
    _stop: threading.Event
    _thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"owner": self.owner, "heartbeat": time.time(), "ray_job": os.environ.get("RAY_JOB_ID", "")}

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                _write(self.spec, "lock.json", self._record())
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the run goes on
                log.warning("job %s: lock heartbeat failed: %s", self.spec.name, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=HEARTBEAT_S)
        held = _read(self.spec, "lock.json")
        if held and held.get("owner") == self.owner:
            _delete(self.spec, "lock.json")

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _refusal(spec: JobSpec, held: dict, now: float) -> JobRunningError:
    who = f"driver {held.get('owner', '(another one, starting at the same time)')}"
    if held.get("ray_job"):
        who += f", Ray job {held['ray_job']} (stop it with `ray job stop {held['ray_job']}`)"
    beat = f", last heartbeat {now - float(held['heartbeat']):.0f} s ago" if "heartbeat" in held else ""
    return JobRunningError(
        f"job {spec.name} is already running: {who}{beat}, lock {state_url(spec, 'lock.json')}; wait for it "
        f"to finish (a lock without a heartbeat for {STALE_S:.0f} s is taken over)"
    )


def _owner_gone(held: dict) -> bool:
    """The lock's owner was a process on this machine that no longer exists (a killed driver)."""
    host, _, rest = str(held.get("owner", "")).partition(":")
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
    """Hold the job's lock, or raise ``JobRunningError`` if a live driver holds it.

    Object stores have no atomic create-if-absent here, so a write is read back after
    ``settle_s``: of two drivers that wrote at once, the one whose record stayed wins.
    """
    now = time.time()
    held = _read(spec, "lock.json")
    if held and now - float(held.get("heartbeat", 0)) < STALE_S and not _owner_gone(held):
        raise _refusal(spec, held, now)
    if held:
        log.warning("job %s: taking over a stale lock of %s", spec.name, held.get("owner"))
    lock = JobLock(spec, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", threading.Event())
    _write(spec, "lock.json", lock._record())
    time.sleep(settle_s)
    held = _read(spec, "lock.json")
    if not held or held.get("owner") != lock.owner:
        raise _refusal(spec, held or {}, time.time())
    lock._thread = threading.Thread(target=lock._beat, name=f"lock-{spec.name}", daemon=True)
    lock._thread.start()
    return lock
