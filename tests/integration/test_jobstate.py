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
from tests.s3fixtures import FaultProxy

pytestmark = pytest.mark.integration


def locked_job(tmp_path, storage_section: dict | None = None, **lock):
    tree = tiny_job(tmp_path, name="locked")
    if storage_section is not None:
        tree["storage"] = storage_section
    tree["storage"]["lock"] = lock
    return validate(tree)


@pytest.fixture(params=["file", "s3"])
def spec(request, tmp_path):
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        return locked_job(tmp_path, {"path": s3.url("runs"), "endpoint_url": s3.endpoint})
    return locked_job(tmp_path)


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
    old = {"owner": "elsewhere:1:x", "heartbeat": time.time() - spec.storage.lock.stale_s - 1, "ray_job": ""}
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


def test_the_heartbeat_keeps_the_lock_fresh(spec):
    spec = spec.model_copy(update={"storage": spec.storage.model_copy(update={"lock": spec.storage.lock.model_copy(
        update={"heartbeat_s": 0.2})})})  # fmt: skip
    url, opts = jobstate.state_url(spec, "lock.json"), spec.storage.options()
    with jobstate.acquire(spec, settle_s=0.1):
        first = json.loads(storage.read_bytes(url, opts))["heartbeat"]
        time.sleep(1.0)
        assert json.loads(storage.read_bytes(url, opts))["heartbeat"] > first


def test_of_drivers_racing_for_the_lock_exactly_one_holds_it(spec):
    import threading

    barrier, held, refused = threading.Barrier(6), [], []

    def driver() -> None:
        barrier.wait()
        try:
            held.append(jobstate.acquire(spec, settle_s=0.1))
        except jobstate.JobRunningError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=driver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) == 1 and len(refused) == 5
    assert all("job locked is already running" in str(e) for e in refused)
    held[0].release()


def test_a_driver_cut_off_from_s3_past_stale_s_stops_and_leaves_the_takers_lock_alone(s3, tmp_path):
    import threading

    proxy = FaultProxy(s3.endpoint, match="", failures=0, mode="reset", methods=("GET", "PUT", "DELETE", "HEAD"))
    try:
        section = {"path": s3.url("runs"), "retry_budget_s": 0.3}
        cut_off = locked_job(tmp_path, {**section, "endpoint_url": proxy.endpoint}, heartbeat_s=0.2, stale_s=1.0)
        other = locked_job(tmp_path, {**section, "endpoint_url": s3.endpoint}, heartbeat_s=0.2, stale_s=1.0)
        stopped = threading.Event()
        first = jobstate.acquire(cut_off, settle_s=0.1, stop=stopped.set)
        proxy.remaining = 10**9  # every request of the first driver is dropped from here on
        time.sleep(1.5)  # past stale_s without a renewal
        with jobstate.acquire(other, settle_s=0.1, stop=lambda: None) as taker:
            record = json.loads(storage.read_bytes(jobstate.state_url(other, "lock.json"), other.storage.options()))
            proxy.remaining = 0  # the first driver is back: its next renewal finds the lock changed
            assert stopped.wait(5.0) and first.lost.is_set()
            time.sleep(0.6)  # three of its beats, had it kept beating
            now = json.loads(storage.read_bytes(jobstate.state_url(other, "lock.json"), other.storage.options()))
            assert now["owner"] == taker.owner == record["owner"] and not taker.lost.is_set()
            first.release()  # deletes nothing: the lock is not its own
            assert taker.held()
        assert "locked: another driver took over its lock" in str(jobstate.lock_lost(other))
    finally:
        proxy.close()


def test_a_store_that_ignores_conditions_is_refused_or_settled_as_the_spec_says(s3, tmp_path, caplog):
    proxy = FaultProxy(s3.endpoint, match="", failures=0, strip_conditions=True)
    try:
        section = {"path": s3.url("runs"), "endpoint_url": proxy.endpoint}
        with pytest.raises(jobstate.UnconditionalStoreError) as refused:
            jobstate.acquire(locked_job(tmp_path, section), settle_s=0.1)
        assert "ignores conditional writes" in str(refused.value) and "--no-lock" in str(refused.value)
        assert "storage.lock.without_conditions: settle" in str(refused.value)
        with jobstate.acquire(locked_job(tmp_path, section, without_conditions="settle"), settle_s=0.1) as held:
            assert held.held() and not held.store.atomic
        assert "falls back to write, settle and read back" in caplog.text
    finally:
        proxy.close()


def test_finished_runs_and_new_runs(spec):
    assert jobstate.current_run(spec) == "locked" and jobstate.finished_step(spec, "locked") is None
    jobstate.mark_finished(spec, "locked", 30)
    assert jobstate.finished_step(spec, "locked") == 30
    fresh = jobstate.start_new_run(spec)
    assert fresh.startswith("locked-") and jobstate.current_run(spec) == fresh
    assert jobstate.finished_step(spec, fresh) is None
