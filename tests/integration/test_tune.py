"""`flowpp tune` on real Ray, Tune, Train and MLflow: a killed search resumed. (ASHA stopping laggards
and the registration of the best trial: tests/e2e/test_demo_submit.py, on a search of four trials that
`ray job submit` runs on the local stack.)

Each search runs as its own process (embedded Ray with 2 CPUs, as on this machine), so a
test can kill it by pid. Trials: the debug preset on 16x16 demo patches, one worker of
half a CPU each, two at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.jobs import tiny_job, write_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def search_job(tmp_path: Path, name: str, space: dict, max_steps: int) -> Path:
    """The tiny job as a search: one worker of half a CPU a trial, two trials at a time."""
    tree = tiny_job(
        tmp_path,
        name=name,
        model__checkpoint="attention",
        data__prepare_count=128,
        data__num_workers=0,
        train__max_steps=max_steps,
        train__eval_every=10,
        train__keep_checkpoints=1,
        train__sample_grid=0,
        train__ema_decay=0.9,
        train__trace_dir=None,
        scaling={"max_failures": 1},
        mlflow__experiment="tune",
        mlflow__registered_model="tuned",
        tune={
            "space": space,
            "scheduler": {"time_attr": "step", "max_t": max_steps, "grace_period": 10, "reduction_factor": 2},
            "workers_per_trial": 1,
            "cpus_per_worker": 0.5,
            "driver_cpus": 0.05,
            "max_concurrent_trials": 2,
        },
    )
    return write_job(tree, tmp_path / f"{name}.yaml")


def tune_cmd(job: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "tune", str(job), *extra]


def env() -> dict:
    # every worker's log line reaches the driver's output (no cross-worker deduplication)
    # (the embedded Ray of each command makes its own token: RAY_AUTH_MODE=token, a 0600 file)
    e = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONPATH": str(ROOT)}
    e.pop("RAY_ADDRESS", None)
    return e


def mlflow_view(tmp_path: Path, search: str):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tune").experiment_id
    parent = client.search_runs([exp], f"tags.`flowpp.job` = '{search}'")[0]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, children


def _recorded_checkpoints(tmp_path: Path, search: str) -> dict[str, int]:
    """Trial -> step of the last checkpoint its Ray Train controller recorded (what a resume uses).

    A checkpoint folder on disk is not enough: a controller killed before it records the
    report resumes from the one before.
    """
    steps = {}
    for snap in (tmp_path / "runs" / search / "trials").glob("*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError):  # caught mid-write
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
            if latest:
                steps[snap.parent.name] = int(latest["metrics"]["step"])
    return steps


@pytest.mark.slow
def test_killed_search_resumes_unfinished_trials_from_their_checkpoints(tmp_path):
    job = search_job(tmp_path, "resume", {"model.num_components": {"grid": [2, 4]}}, max_steps=30)
    family: list[psutil.Process] = []
    driver = subprocess.Popen(
        tune_cmd(job),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not _recorded_checkpoints(tmp_path, "resume"):
            assert time.monotonic() < deadline and driver.poll() is None, "no trial checkpoint was recorded"
            time.sleep(0.2)
        family = psutil.Process(driver.pid).children(recursive=True)
        driver.kill()  # the search's driver, by pid; its embedded Ray goes with it
        driver.wait()
    finally:
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    checkpointed = _recorded_checkpoints(tmp_path, "resume")
    assert checkpointed and all(step < 30 for step in checkpointed.values())

    again = subprocess.run(tune_cmd(job), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr  # no silent restart from scratch
    assert mlflow_view(tmp_path, "resume")[1].info.status == "FAILED"  # a search that fails marks its run

    out = subprocess.run(
        tune_cmd(job, "--resume"), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-4000:]
    logs = out.stdout + out.stderr
    assert any(f"resumed from step {step}" in logs for step in checkpointed.values()), logs[-3000:]
    client, parent, children = mlflow_view(tmp_path, "resume")
    assert len(children) == 2  # the resumed trials kept their child runs
    assert all(c.data.tags.get("flowpp.trial_status") in ("complete", "stopped early") for c in children)
    assert "flowpp.registered_version" in parent.data.tags
    assert parent.info.status == "FINISHED"  # the resumed search ran again, and finished
