"""A job's lock and run records (orchestrator.driver.jobstate) on real storage: local files and moto S3."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from orchestrator.config import validate
from orchestrator.core import storage
from orchestrator.driver import jobstate
from tests.jobs import tiny_job

pytestmark = pytest.mark.integration


@pytest.fixture(params=["file", "s3"])
def spec(request, tmp_path):
    tree = tiny_job(tmp_path, name="locked")
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        tree["storage"] = {"path": s3.url("runs"), "endpoint_url": s3.endpoint}
    return validate(tree)


def test_a_second_driver_of_a_running_job_is_refused_until_the_first_releases(spec):
    first = jobstate.acquire(spec, settle_s=0.1)
    with pytest.raises(jobstate.JobRunningError) as refused:
        jobstate.acquire(spec, settle_s=0.1)
    message = str(refused.value)
    assert "job locked is already running" in message and first.owner in message
    assert jobstate.state_url(spec, "lock.json") in message
    first.release()
    with jobstate.acquire(spec, settle_s=0.1) as second:
        assert second.owner != first.owner
    assert storage.object_size(jobstate.state_url(spec, "lock.json"), spec.storage.options()) is None


def test_a_stale_or_orphaned_lock_is_taken_over(spec):
    url, opts = jobstate.state_url(spec, "lock.json"), spec.storage.options()
    old = {"owner": "elsewhere:1:x", "heartbeat": time.time() - jobstate.STALE_S - 1, "ray_job": ""}
    storage.write_bytes(url, json.dumps(old).encode(), opts)
    jobstate.acquire(spec, settle_s=0.1).release()

    # a fresh heartbeat, but its owner was a process of this machine that has exited
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = {"owner": f"{socket.gethostname()}:{gone.stdout.strip()}:y", "heartbeat": time.time(), "ray_job": ""}
    storage.write_bytes(url, json.dumps(orphan).encode(), opts)
    jobstate.acquire(spec, settle_s=0.1).release()

    # a fresh heartbeat from another machine is respected
    storage.write_bytes(url, json.dumps({**old, "heartbeat": time.time(), "ray_job": "raysubmit_x"}).encode(), opts)
    with pytest.raises(jobstate.JobRunningError, match="ray job stop raysubmit_x"):
        jobstate.acquire(spec, settle_s=0.1)


def test_the_heartbeat_keeps_the_lock_fresh(spec, monkeypatch):
    monkeypatch.setattr(jobstate, "HEARTBEAT_S", 0.2)
    url, opts = jobstate.state_url(spec, "lock.json"), spec.storage.options()
    with jobstate.acquire(spec, settle_s=0.1):
        first = json.loads(storage.read_bytes(url, opts))["heartbeat"]
        time.sleep(1.0)
        assert json.loads(storage.read_bytes(url, opts))["heartbeat"] > first


def test_finished_runs_and_new_runs(spec):
    assert jobstate.current_run(spec) == "locked" and jobstate.finished_step(spec, "locked") is None
    jobstate.mark_finished(spec, "locked", 30)
    assert jobstate.finished_step(spec, "locked") == 30
    fresh = jobstate.start_new_run(spec)
    assert fresh.startswith("locked-") and jobstate.current_run(spec) == fresh
    assert jobstate.finished_step(spec, fresh) is None
