"""The training job on real Ray: worker loss, driver loss, non-finite losses, two nodes.

All small: the debug preset on 16x16 demo patches, 2 workers of 1 CPU each.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.config import validate
from orchestrator.config.spec import TrainSpec
from orchestrator.data.stream import ShardStream
from tests.jobs import tiny_job, write_job
from tests.rayauth import token_auth
from tests.rayfixtures import local_ray as start_local_ray

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def job(tmp_path: Path, **train) -> dict:
    """The tiny job with ``train.*`` overrides."""
    return tiny_job(tmp_path, **{f"train__{k}": v for k, v in train.items()})


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):

    auth = token_auth(tmp_path_factory.mktemp("ray-auth"))
    with start_local_ray(num_cpus=3):
        yield
    auth.restore()


def trace(tmp_path: Path, rank: int) -> list[dict]:
    path = tmp_path / "trace" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def expected_keys(spec, rank: int, steps: int) -> list[list[str]]:
    """The batches an uninterrupted run would train on, epoch after epoch."""
    s = ShardStream(
        spec.data.train,
        batch_size=spec.per_worker_batch,
        rank=rank,
        world_size=2,
        seed=spec.train.seed,
        num_workers=spec.data.num_workers,
        shuffle_buffer=spec.data.shuffle_buffer,
    )
    out = []
    while len(out) < steps:
        out.extend(b["keys"] for b in s)
    return out[:steps]


def registered_step(tmp_path: Path) -> int:
    """Step of the latest checkpoint Ray Train has registered (persisted in its snapshot)."""
    for snap in (tmp_path / "runs").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
        except ValueError:
            continue
        if latest:
            return int(latest["metrics"]["step"])
    return -1


def ray_train_workers() -> list[psutil.Process]:
    me = psutil.Process()
    return [p for p in me.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint_without_skipping_data(tmp_path, local_ray):
    from orchestrator.driver.launch import run_training

    spec = validate(job(tmp_path, max_steps=40))
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=run_training(spec)))
    thread.start()
    deadline = time.monotonic() + 300
    while registered_step(tmp_path) < 10 or trace(tmp_path, 1)[-1]["step"] < registered_step(tmp_path) + 2:
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint was registered"
        time.sleep(0.05)
    checkpointed = registered_step(tmp_path)
    victims = [p for p in ray_train_workers() if p.pid == trace(tmp_path, 1)[-1]["pid"]]
    assert victims, "could not find the rank-1 training worker"
    os.kill(victims[0].pid, signal.SIGKILL)  # from outside, by pid
    thread.join(timeout=600)
    result = box["result"]
    assert result.error is None and result.metrics["step"] == 40
    assert 0 <= result.metrics["data_wait_pct"] < 100 and result.metrics["substituted_samples"] == 0
    # the last report carries the final importance-weighted evaluation; the registered version both figures
    assert 0 < result.metrics["val_bpd_iw"] < 16
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=spec.mlflow.tracking_uri)
    (version,) = client.search_model_versions(f"name='{spec.mlflow.registered_model}'")
    assert float(version.tags["val_bpd_iw"]) == pytest.approx(result.metrics["val_bpd_iw"], abs=1e-6)
    assert float(version.tags["val_bpd"]) == pytest.approx(result.metrics["val_bpd"], abs=1e-6)
    assert version.tags["val_bpd_iw_samples"] == "2"

    for rank in (0, 1):
        records = [r for r in trace(tmp_path, rank) if "step" in r]
        pids = {r["pid"] for r in records}
        assert len(pids) >= 2, "the worker group was not restarted"
        restart = next(i for i, r in enumerate(records) if i and r["step"] <= records[i - 1]["step"])
        resumed_at = records[restart]["step"]
        # the last registered checkpoint before the kill (one more may have landed meanwhile)
        assert resumed_at in (checkpointed, checkpointed + 10), (resumed_at, checkpointed)
        final = {r["step"]: r["keys"] for r in records}
        assert sorted(final) == list(range(40))
        assert [final[s] for s in range(40)] == expected_keys(spec, rank, 40)


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_the_run_keeping_the_checkpoint(tmp_path, local_ray):
    from orchestrator.driver.launch import TrainingFailed, run_training

    # 8 steps at 2e-3 (checkpoints at 4 and 8), then a rate of 1e4: step 8's update blows the weights up
    # (finite, but huge), so from step 9 on every loss is non-finite, on every seed (the ramp of old
    # reached its blow-up anywhere from step 2 to 60)
    phases = [
        {"kind": "warmup", "steps": 8, "start": 2e-3, "to": 2e-3},
        {"kind": "warmup", "steps": 1, "start": 1e4, "to": 1e4},
        {"kind": "hold"},
    ]
    spec = validate(
        job(
            tmp_path,
            lr=1e4,
            warmup_steps=TrainSpec.model_fields["warmup_steps"].default,  # piecewise: the phases warm up
            schedule={"kind": "piecewise", "phases": phases},
            max_steps=1000,
            checkpoint_every=4,
            max_nonfinite_steps=3,
            eval_every=1000,
        )
    )
    spec = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"max_failures": 0})})
    with pytest.raises(TrainingFailed, match="3 consecutive non-finite losses"):
        run_training(spec)
    records = [r for r in trace(tmp_path, 0) if "step" in r]
    skipped = [r["step"] for r in records if r["skipped"]]
    assert len(skipped) >= 3 and skipped[-3:] == list(range(skipped[-1] - 2, skipped[-1] + 1))
    kept = registered_step(tmp_path)  # the last good checkpoint is kept
    assert 0 < kept <= skipped[-1]  # skipped steps leave the weights untouched: still a good checkpoint
    snap = json.loads(next((tmp_path / "runs").glob("*/checkpoint_manager_snapshot.json")).read_text())
    ckpt = next((tmp_path / "runs").glob(f"*/{snap['latest_checkpoint_result']['checkpoint_dir_name']}"))
    assert json.loads((ckpt / "meta.json").read_text())["step"] == kept
    import torch

    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _group_state() -> tuple[int, int, float, str, bool]:
    """On a worker: its rank and world size, an all-reduce of rank + 1, the master address, and
    whether the process group is up."""
    import torch
    import torch.distributed as dist

    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x)
    return dist.get_rank(), dist.get_world_size(), x.item(), os.environ["MASTER_ADDR"], dist.is_initialized()


def _group_is_up() -> bool:
    import torch.distributed as dist

    return dist.is_initialized()


def test_the_backend_serves_the_store_from_rank_zero_and_every_rank_joins(local_ray):
    """training/rendezvous's backend, as Ray Train's controller drives it, here in the test's own
    process: a real group of two Ray Train worker actors, started, used and shut down."""
    from ray.train._internal.worker_group import WorkerGroup

    from orchestrator.training.rendezvous import StoreOnMasterConfig

    config = StoreOnMasterConfig(backend="gloo", timeout_s=60)
    backend = config.backend_cls()
    group = WorkerGroup(num_workers=2, resources_per_worker={"CPU": 1})
    try:
        backend.on_start(group, config)
        states = sorted(group.execute(_group_state))
        assert states == [(0, 2, 3.0, "127.0.0.1", True), (1, 2, 3.0, "127.0.0.1", True)]
        backend.on_shutdown(group, config)
        assert group.execute(_group_is_up) == [False, False]
    finally:
        group.shutdown()


@pytest.mark.slow
def test_a_driver_frozen_past_stale_s_stops_when_it_wakes_and_leaves_the_takers_lock_alone(tmp_path):
    """A driver that cannot renew the job's lock for storage.lock.stale_s (frozen here, as a VM
    pause or a long GC would freeze it) loses it to the next driver; when it wakes, its first
    renewal finds the lock changed, and it stops at once, naming the cause, writing nothing more."""
    from orchestrator.driver import jobstate

    tree = job(tmp_path, max_steps=2000, checkpoint_every=10)
    tree["storage"]["lock"] = {"heartbeat_s": 0.5, "stale_s": 2.0}
    path = write_job(tree, tmp_path / "job.yaml")
    spec = validate(tree)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "driver.log", "wb")  # noqa: SIM115  (closed below)
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", str(path)], cwd=tmp_path, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    family: list[psutil.Process] = []
    taker = None
    try:
        deadline = time.monotonic() + 300
        while registered_step(tmp_path) < 10:
            assert time.monotonic() < deadline and driver.poll() is None, "no checkpoint was registered"
            time.sleep(0.05)
        family = psutil.Process(driver.pid).children(recursive=True)
        os.kill(driver.pid, signal.SIGSTOP)
        time.sleep(3.0)  # past stale_s: no renewal
        taker = jobstate.acquire(spec, settle_s=0.1, stop=lambda: None)  # the next driver
        os.kill(driver.pid, signal.SIGCONT)
        assert driver.wait(timeout=120) != 0
        out = (tmp_path / "driver.log").read_text(errors="replace")
        assert "its lock" in out and "was taken over by " + taker.owner in out, out[-3000:]
        assert f"job {spec.name}: another driver took over its lock" in out, out[-3000:]
        assert taker.held() and not taker.lost.is_set()  # the taker's record is untouched
        assert jobstate.finished_step(spec, spec.name) is None  # the stopped driver marked nothing finished
        assert registered_step(tmp_path) >= 10  # its checkpoints are kept
    finally:
        log.close()
        if taker is not None:
            taker.release()
        if driver.poll() is None:
            driver.kill()
        for p in family:  # the driver's embedded Ray processes, by pid
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


@pytest.mark.slow
def test_killed_driver_then_resubmitted_job_resumes(tmp_path):
    tree = job(tmp_path, max_steps=40)
    tree["scaling"]["peak_tflops"] = 0.05  # an MFU on a CPU too
    path = write_job(tree, tmp_path / "job.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the embedded Ray makes its own token
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "orchestrator", "train", str(path)]
    family: list[psutil.Process] = []
    log = open(tmp_path / "driver.log", "wb")  # noqa: SIM115  (closed below)
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while registered_step(tmp_path) < 10:
            said = (tmp_path / "driver.log").read_text(errors="replace")[-3000:] if driver.poll() is not None else ""
            assert time.monotonic() < deadline and driver.poll() is None, f"no checkpoint was registered: {said}"
            time.sleep(0.05)
        checkpointed = registered_step(tmp_path)
        family = psutil.Process(driver.pid).children(recursive=True)
        driver.kill()  # the driver, by pid: its embedded Ray goes with it
        driver.wait()
    finally:
        log.close()
        for p in family:  # the driver's embedded Ray processes, by pid
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [r for r in trace(tmp_path, 0) if "step" in r]
    second_run = [r for r in records if r["pid"] not in {records[0]["pid"]}]
    resumed_at = second_run[0]["step"]
    assert resumed_at in (checkpointed, checkpointed + 10)  # from the checkpoint, not from 0
    assert f"resumed from step {resumed_at}" in out.stderr + out.stdout
    # the log line holds the run's figures; Ray Train's line for every report on every rank is off
    lines = [ln for ln in out.stderr.splitlines() if re.search(r"step \d+/40  bits/dim", ln)]
    assert lines, out.stderr[-3000:]
    for part in ("images/s ", "lr ", "grad_norm ", "mfu ", "data_wait ", "substituted 0", "eta "):
        assert all(part in ln for ln in lines), (part, lines[-1])
    assert "Reporting training result" not in out.stderr + out.stdout
