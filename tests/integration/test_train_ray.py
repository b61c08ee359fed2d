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
from orchestrator.data.stream import for_job as stream_for_job
from tests.jobs import tiny_job, write_job
from tests.rayauth import token_auth
from tests.rayfixtures import local_ray as start_local_ray
from tests.s3fixtures import ACCESS_KEY, SECRET, FaultProxy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def job(tmp_path: Path, **train) -> dict:
    """The tiny job with ``train.*`` overrides."""
    return tiny_job(tmp_path, **{f"train__{k}": v for k, v in train.items()})


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """Ray of 3 CPUs whose workers have the moto endpoint's credentials in their environment, as a
    cluster's workers have theirs (an instance role, or the variables)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        patch.delenv(var, raising=False)
    auth = token_auth(tmp_path_factory.mktemp("ray-auth"))
    try:
        with start_local_ray(num_cpus=3):
            yield
    finally:
        auth.restore()
        patch.undo()


def trace(tmp_path: Path, rank: int) -> list[dict]:
    path = tmp_path / "trace" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def expected_keys(spec, rank: int, steps: int) -> list[list[str]]:
    """The batches an uninterrupted run would train on, epoch after epoch."""
    s = stream_for_job(spec, "train", rank=rank, world=2)
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
    def cmdline(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # exited meanwhile, or a zombie not yet reaped (a Ray worker that just ended)
            return ""

    return [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in cmdline(p)]


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

    # bit-identical to a run of the same spec that nothing interrupted: the restored RNG states give the
    # same dequantization noise, the data plan the same batches, the checkpoint the same Adam and EMA state
    twin_dir = tmp_path / "twin"
    twin_dir.mkdir()
    twin = job(twin_dir, max_steps=40)
    twin["data"].update(train=spec.data.train, valid=spec.data.valid)
    twin_result = run_training(validate(twin))
    assert twin_result.error is None and twin_result.metrics["step"] == 40
    killed, uninterrupted = (
        [r for r in trace(where, rank) if "params_sha256" in r] for where, rank in ((tmp_path, 0), (twin_dir, 0))
    )
    assert killed[-1]["final_step"] == uninterrupted[-1]["final_step"] == 40
    assert killed[-1]["params_sha256"] == uninterrupted[-1]["params_sha256"]
    assert twin_result.metrics["val_bpd_iw"] == result.metrics["val_bpd_iw"]


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


# -- checkpoint uploads off the step ---------------------------------------------------
DELAY_S = 1.0
"""What the proxy adds to every write (PUT, POST) to the bucket: far more than a tiny step takes
(and under the 3 s without a byte after which pyarrow's S3 client gives a request up)."""

PARTS = {"state.pt", "meta.json", "rng-rank0.pt", "rng-rank1.pt"}
"""The files of one complete checkpoint of 2 workers."""


def complete_checkpoints(client, bucket: str, prefix: str) -> set[str]:
    """The checkpoint folders under ``prefix`` that hold every part."""
    parts: dict[str, set[str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            folder, _, name = obj["Key"].rpartition("/")
            if "/checkpoint_" in f"/{folder}":
                parts.setdefault(folder, set()).add(name)
    return {folder for folder, names in parts.items() if names >= PARTS}


def step_gap(tmp_path: Path, step: int) -> float:
    """Seconds between rank 0's records of ``step - 1`` and ``step``: the step that follows the
    report of a checkpoint taken after ``step`` steps."""
    at = {r["step"]: r["time"] for r in trace(tmp_path, 0) if "step" in r}
    return at[step] - at[step - 1]


@pytest.mark.slow
def test_a_slow_store_holds_up_no_step_and_a_complete_checkpoint_is_always_kept(tmp_path, s3_endpoint, local_ray):
    """Every checkpoint write held DELAY_S: synchronous uploads would hold the checkpoint's step up
    that long at least (``bench/checkpoint_upload.py`` measures both modes); in the background the
    step takes no longer than another."""
    import boto3

    from orchestrator.driver.launch import run_training

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET)  # fmt: skip
    bucket = f"uploads-{tmp_path.name[-8:].lower().replace('_', '-')}"
    client.create_bucket(Bucket=bucket)
    # the writes of checkpoints (folders checkpoint_<date>), not of the lock or Ray Train's snapshot
    proxy = FaultProxy(s3_endpoint, "/checkpoint_2", failures=-1, mode="slow", methods=("PUT", "POST"), delay_s=DELAY_S)
    tree = job(tmp_path, max_steps=20, checkpoint_every=10, keep_checkpoints=1, eval_every=20, log_every=10,
               final_eval_samples=0, sample_grid=0, async_uploads=True)  # fmt: skip
    tree["storage"] = {"path": f"s3://{bucket}/runs", "endpoint_url": proxy.endpoint}
    seen: list[set[str]] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(complete_checkpoints(client, bucket, "runs/"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_training(validate(tree))
    finally:
        done.set()
        watcher.join(timeout=30)
        proxy.close()
    assert result.error is None and result.metrics["step"] == 20, result.error
    assert proxy.injected >= 2 * len(PARTS)  # both checkpoints' writes were held
    # the step after the checkpoint's report is not held up by a single write (each is held 1 s; on
    # the step, rank 0's three would hold it that long at least)
    assert step_gap(tmp_path, 10) < DELAY_S
    assert result.metrics["upload_wait_s"] < DELAY_S / 2  # the bound of uploads in flight was never met
    # from the first complete checkpoint on, one is always there (keep_checkpoints: 1): the older is
    # deleted only once the newer is complete in storage
    first = next(i for i, s in enumerate(seen) if s)
    assert all(seen[first:]), [len(s) for s in seen]
    assert len(complete_checkpoints(client, bucket, "runs/")) == 1


# -- evaluation as validation tasks -------------------------------------------------------
def task_job(tmp_path: Path, **eval_task) -> dict:
    """20 steps, an evaluation at 10 and 20 (with the final bound) as validation tasks of 1 CPU."""
    tree = job(tmp_path, max_steps=20, checkpoint_every=20, eval_every=10, log_every=10, keep_checkpoints=2,
               sample_grid=2, final_eval_samples=2)  # fmt: skip
    tree["train"]["eval_task"] = {"cpus": 1, **eval_task}
    return tree


@pytest.mark.slow
def test_evaluations_run_as_validation_tasks_logged_at_their_steps_and_the_final_figure_registers(
    tmp_path, local_ray, caplog
):
    import mlflow

    from orchestrator.driver.launch import run_training

    spec = validate(task_job(tmp_path))
    with caplog.at_level("INFO"):
        result = run_training(spec)
    assert result.error is None and result.metrics["step"] == 20
    # the workers never evaluated: the figures came from the tasks, into the checkpoints' metrics
    kept = {m["step"]: m for _, m in result.best_checkpoints}
    assert sorted(kept) == [10, 20] and kept[10]["eval_requested"] == 1 and kept[20]["eval_requested"] == 2
    assert 0 < kept[10]["val_bpd"] < 16 and 0 < kept[20]["val_bpd_iw"] < 16
    client = mlflow.MlflowClient(tracking_uri=spec.mlflow.tracking_uri)
    (version,) = client.search_model_versions(f"name='{spec.mlflow.registered_model}'")
    run = client.get_run(version.run_id)
    # MLflow has each figure at the step it belongs to, and the sample grids by step
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_bpd")] == [
        (10, pytest.approx(kept[10]["val_bpd"])),
        (20, pytest.approx(kept[20]["val_bpd"])),
    ]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_bpd_iw")] == [20]
    # registered once the final figure was in, with it; the run closed by the driver
    assert float(version.tags["val_bpd_iw"]) == pytest.approx(kept[20]["val_bpd_iw"], abs=1e-6)
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_validation_tasks_that_time_out_cost_their_figures_never_the_training_and_register_nothing(
    tmp_path, local_ray, caplog
):
    import mlflow

    from orchestrator.driver.launch import run_training
    from orchestrator.training.validation import FinalFigureMissing

    spec = validate(task_job(tmp_path, timeout_s=0.001, final_timeout_s=0.001))  # no task can finish
    with caplog.at_level("INFO"), pytest.raises(FinalFigureMissing) as missing:
        run_training(spec)
    assert str(missing.value).startswith("step 20: the final evaluation gave no val_bpd_iw")
    assert "is not registered; the run's checkpoints are kept" in str(missing.value)
    # training went on to the end: both checkpoints reported, without figures
    assert max(r["step"] for r in trace(tmp_path, 0) if "step" in r) == 19
    lines = [r.getMessage() for r in caplog.records if "no validation figure" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["step 10", "step 20"], lines
    client = mlflow.MlflowClient(tracking_uri=spec.mlflow.tracking_uri)
    assert client.search_model_versions(f"name='{spec.mlflow.registered_model}'") == []
    exp = client.get_experiment_by_name(spec.mlflow.experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
