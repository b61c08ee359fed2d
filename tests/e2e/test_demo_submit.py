"""The main job end to end: infra/local/up, a real `ray job submit`, then checks on what it left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs import shrunk_demo
from tests.s3fixtures import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line.removeprefix("export ").split("=", 1)
            env[k] = v
    return env


def bucket_keys(env: dict, prefix: str) -> list[str]:
    """Keys under ``prefix`` in the stack's bucket ``e2e``."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=env["FLOWPP_S3_ENDPOINT"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="e2e", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    ports = {
        "FLOWPP_S3_PORT": free_port(),
        "FLOWPP_MLFLOW_PORT": free_port(),
        "FLOWPP_RAY_PORT": free_port(),
        "FLOWPP_DASHBOARD_PORT": free_port(),
    }
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "FLOWPP_LOCAL": str(state),
        "FLOWPP_RAY_TMP": str(state / "ray"),
        "VENV_BIN": str(Path(sys.executable).parent),
        "FLOWPP_BUCKET": "e2e",
    }
    try:
        subprocess.run([str(ROOT / "infra/local/up")], env=env, check=True, timeout=300)
        stack = {**env, **_env_file(state / "env")}
        stack["PATH"] = f"{Path(sys.executable).parent}:{stack['PATH']}"  # `ray`, `flowpp`: this venv's
        yield state, stack
    finally:
        subprocess.run([str(ROOT / "infra/local/down")], env=env, timeout=120)


def test_ray_job_submit_trains_evaluates_and_registers(local_stack):
    state, env = local_stack
    sets = shrunk_demo(
        name="e2e-demo", train__max_steps=16, train__log_every=4, train__checkpoint_every=8, train__eval_every=16
    )
    cmd = [
        "ray",
        "job",
        "submit",
        "--address",
        env["RAY_DASHBOARD"],
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "-m",
        "orchestrator",
        "train",
        "jobs/demo.yaml",
        *sets,
    ]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", log).group(0)
    assert JobSubmissionClient(env["RAY_DASHBOARD"]).get_job_status(job_id) == JobStatus.SUCCEEDED

    import mlflow

    keys = bucket_keys(env, "runs/e2e-demo/")
    assert any("/checkpoint_" in k and k.endswith("state.pt") for k in keys), keys[:20]
    assert "data/demo/train/manifest.json" in bucket_keys(env, "data/demo/")

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name='flowpp-demo'")
    assert versions, "no registered version"
    v = max(versions, key=lambda m: int(m.version))
    assert float(v.tags["val_bpd"]) > 0 and float(v.tags["val_bpd_iw"]) > 0
    run = client.get_run(v.run_id)
    assert {"train_bpd", "val_bpd", "val_bpd_iw", "images_per_s", "lr", "grad_norm"} <= set(run.data.metrics)
    assert run.data.params["model.preset"] == "debug"
    assert not any("secret" in k.lower() for k in run.data.params)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "job.yaml" in artifacts and "samples" in artifacts

    from orchestrator.tracking import load_flow

    model = load_flow(f"models:/flowpp-demo/{v.version}", tracking_uri=env["MLFLOW_TRACKING_URI"])
    assert model.sample(2).shape == (2, 3, 16, 16)

    # make demo's last step: the first registered version becomes @champion, scored on the
    # run's own held-out shards in the bucket
    flowpp = str(Path(sys.executable).parent / "flowpp")
    promote = [flowpp, "promote", "--model", "flowpp-demo", "--s3-endpoint", env["FLOWPP_S3_ENDPOINT"]]
    out = subprocess.run(promote, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert f"promoted: flowpp-demo@champion = v{v.version}" in out.stdout
    assert client.get_model_version_by_alias("flowpp-demo", "champion").version == v.version


def test_flowpp_submit_uses_the_yaml_ray_section_and_streams_logs(local_stack):
    state, env = local_stack
    sets = shrunk_demo(
        name="e2e-submit",
        train__max_steps=4,
        train__warmup_steps=1,
        train__log_every=2,
        train__checkpoint_every=4,
        train__eval_every=4,
        train__eval_batches=1,
        data__prepare_count=64,
        data__prepare_valid_count=16,
        mlflow__registered_model="flowpp-e2e-submit",
    )
    cmd = [sys.executable, "-m", "orchestrator", "submit", "jobs/demo.yaml", *sets]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert f"to {env['RAY_DASHBOARD']}" in log  # the address came from the YAML (via ${RAY_DASHBOARD})
    assert "step 4/4" in log and "SUCCEEDED" in log  # the job's own log lines were streamed back


def test_ray_job_submit_runs_a_tune_search_and_registers_its_best(local_stack):
    state, env = local_stack
    sets = shrunk_demo(
        name="e2e-tune",
        train__max_steps=20,
        train__eval_every=10,
        train__eval_batches=1,
        tune__space={"model.num_components": {"grid": [2, 4]}},
        tune__scheduler__max_t=20,
        tune__scheduler__grace_period=10,
        mlflow__registered_model="flowpp-e2e-tune",
    )
    entrypoint = ["python", "-m", "orchestrator", "tune", "jobs/tune-mixtures.yaml", *sets]
    cmd = ["ray", "job", "submit", "--address", env["RAY_DASHBOARD"], "--working-dir", str(ROOT), "--", *entrypoint]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "search e2e-tune: 2 trials" in log and "registered flowpp-e2e-tune version 1" in log

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version("flowpp-e2e-tune", "1")
    assert version.tags["flowpp.trial"] and version.tags["flowpp.search"]
    # the search and its trials live in the job's storage path, in the bucket
    keys = bucket_keys(env, "runs/e2e-tune/")
    assert any(k.startswith("runs/e2e-tune/trials/") and k.endswith("state.pt") for k in keys), keys[:20]
