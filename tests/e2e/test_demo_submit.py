"""The main job end to end: infra/local/up, a real `ray job submit`, then checks on what it left."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.driver import rayauth
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


def bucket(env: dict):
    """An S3 client of the stack's endpoint, with its credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["FLOWPP_S3_ENDPOINT"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def bucket_keys(env: dict, prefix: str) -> list[str]:
    """Keys under ``prefix`` in the stack's bucket ``e2e``."""
    pages = bucket(env).get_paginator("list_objects_v2").paginate(Bucket="e2e", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def bucket_json_lines(env: dict, key: str) -> list[dict]:
    """The JSON lines of object ``key`` in the stack's bucket."""
    body = bucket(env).get_object(Bucket="e2e", Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


DEMO_SETS = dict(
    name="e2e-demo", train__max_steps=16, train__log_every=4, train__checkpoint_every=8, train__eval_every=16
)
"""The first test's job; the later ones submit it again."""


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    ports = {
        "FLOWPP_S3_PORT": free_port(),
        "FLOWPP_MLFLOW_PORT": free_port(),
        "FLOWPP_RAY_PORT": free_port(),
        "FLOWPP_DASHBOARD_PORT": free_port(),
        "FLOWPP_RAY_AGENT_PORT": free_port(),
        "FLOWPP_RAY_CLIENT_PORT": free_port(),
    }
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "FLOWPP_LOCAL": str(state),
        "FLOWPP_RAY_TMP": str(state / "ray"),
        "VENV_BIN": str(Path(sys.executable).parent),
        "FLOWPP_BUCKET": "e2e",
    }
    patch = pytest.MonkeyPatch()
    try:
        subprocess.run([str(ROOT / "infra/local/up")], env=env, check=True, timeout=300)
        stack = {**env, **_env_file(state / "env")}
        stack["PATH"] = f"{Path(sys.executable).parent}:{stack['PATH']}"  # `ray`, `flowpp`: this venv's
        for var in (rayauth.MODE_VAR, rayauth.TOKEN_VAR, rayauth.PATH_VAR):
            patch.delenv(var, raising=False)  # put back at the end
        rayauth.enable(Path(stack[rayauth.PATH_VAR]))  # the token for this process's JobSubmissionClient
        yield state, stack
    finally:
        patch.undo()
        subprocess.run([str(ROOT / "infra/local/down")], env=env, timeout=300)


def test_ray_job_submit_trains_evaluates_and_registers(local_stack):
    state, env = local_stack
    sets = shrunk_demo(**DEMO_SETS)
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
    # a few headline params (MLflow's image card lists them above the sample grid), the whole spec as tags
    assert run.data.params == {"model.preset": "debug", "model.num_components": "4", "train.lr": "0.002"}
    assert run.data.tags["spec.train.global_batch_size"] == "8"  # the shrunk demo's
    assert run.data.tags["data.dataset"] == "scikit-image photograph patches"
    assert not any("secret" in k.lower() for k in run.data.tags)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "job.yaml" in artifacts and "images" in artifacts  # the sample grids, by step

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


def ray_job_submit(env: dict, *train_args: str) -> subprocess.CompletedProcess:
    """``ray job submit ... -- python -m orchestrator train jobs/demo.yaml ARGS``, as `make demo` runs it."""
    entry = ["python", "-m", "orchestrator", "train", "jobs/demo.yaml", *train_args]
    cmd = ["ray", "job", "submit", "--address", env["RAY_DASHBOARD"], "--working-dir", str(ROOT), "--", *entry]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


def promote(env: dict) -> subprocess.CompletedProcess:
    flowpp = str(Path(sys.executable).parent / "flowpp")
    cmd = [flowpp, "promote", "--model", "flowpp-demo", "--s3-endpoint", env["FLOWPP_S3_ENDPOINT"]]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def stack_listeners(state: Path) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket in the stack's process groups."""
    import psutil

    groups = {int(p.read_text()) for p in state.glob("*.pid")}
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if os.getpgid(proc.pid) not in groups:
                continue
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.info["name"], conn.laddr.ip, conn.laddr.port))
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_stack_listens_on_loopback_only_and_refuses_jobs_without_its_token(local_stack):
    import stat
    import urllib.error
    import urllib.request

    state, env = local_stack
    listeners = stack_listeners(state)
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names and len(listeners) >= 8, listeners  # the walk found the stack
    assert [x for x in listeners if not is_loopback(x[1])] == []

    token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert env["RAY_AUTH_MODE"] == "token" and token_file.parent == state
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert token not in (state / "env").read_text()

    def post(headers: dict) -> int:
        body = json.dumps({"entrypoint": "echo pwned"}).encode()
        request = urllib.request.Request(f"{env['RAY_DASHBOARD']}/api/jobs/", data=body, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=30).status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post({}) == 401
    assert post({"Authorization": "Bearer " + "0" * 64}) == 403
    assert post({"Authorization": f"Bearer {token}"}) == 200

    # the Ray CLI without the token is refused too; with the stack's environment it is let in
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    cmd = ["ray", "job", "submit", "--address", env["RAY_DASHBOARD"], "--no-wait", "--", "echo", "pwned"]
    out = subprocess.run(cmd, env=bare, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Authentication required" in out.stdout + out.stderr
    out = subprocess.run(["ray", "job", "list", "--address", env["RAY_DASHBOARD"]], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]


def test_demo_again_and_after_a_restart_does_nothing_then_new_run_competes(local_stack):
    import mlflow

    state, env = local_stack
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    before = {v.version for v in client.search_model_versions("name='flowpp-demo'")}
    champion = client.get_model_version_by_alias("flowpp-demo", "champion").version

    out = ray_job_submit(env, *shrunk_demo(**DEMO_SETS))  # `make demo` twice in a row
    assert out.returncode == 0 and "already finished" in out.stdout, (out.stdout + out.stderr)[-3000:]

    # `make down`, then `make demo`: the bucket (data, checkpoints, MLflow's artifacts) is back
    keys = set(bucket_keys(env, ""))
    shell = {**env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([str(ROOT / "infra/local/down")], env=shell, check=True, timeout=900)
    subprocess.run([str(ROOT / "infra/local/up")], env=shell, check=True, timeout=600)
    assert keys <= set(bucket_keys(env, ""))
    out = ray_job_submit(env, *shrunk_demo(**DEMO_SETS))
    assert out.returncode == 0 and "already finished" in out.stdout, (out.stdout + out.stderr)[-3000:]
    assert {v.version for v in client.search_model_versions("name='flowpp-demo'")} == before  # no nan version
    out = promote(env)
    assert out.returncode == 0 and f"version {champion} is already the champion; nothing to do" in out.stdout, (
        out.stdout + out.stderr
    )[-2000:]

    # --new-run trains afresh, submitted by `flowpp submit`: the address comes from the YAML's ray
    # section (via ${RAY_DASHBOARD}) and the job's own log lines are streamed back; the new version is
    # compared with the first model, still @champion
    cmd = [sys.executable, "-m", "orchestrator", "submit", "jobs/demo.yaml", "--new-run", *shrunk_demo(**DEMO_SETS)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "resumed from step" not in log, log[-3000:]
    assert f"to {env['RAY_DASHBOARD']}" in log and "step 16/16" in log and "SUCCEEDED" in log, log[-3000:]
    new = {v.version: v for v in client.search_model_versions("name='flowpp-demo'")}
    (added,) = set(new) - before
    assert math.isfinite(float(new[added].tags["val_bpd"]))
    out = promote(env)
    assert out.returncode in (0, 3), (out.stdout + out.stderr)[-3000:]
    assert f"champion v{champion}" in out.stdout + out.stderr


def test_a_second_submission_of_a_running_job_is_refused(local_stack):
    from ray.job_submission import JobSubmissionClient

    state, env = local_stack
    sets = shrunk_demo(name="e2e-busy", train__max_steps=2000, mlflow__registered_model="flowpp-e2e-busy")
    submit = [sys.executable, "-m", "orchestrator", "submit", "jobs/demo.yaml", *sets]
    first = subprocess.run([*submit, "--no-wait"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", first.stdout).group(0)
    ray = JobSubmissionClient(env["RAY_DASHBOARD"])
    try:
        second = subprocess.run(submit, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and f"job e2e-busy is already running on {env['RAY_DASHBOARD']} as {job_id}" \
            in second.stderr, second.stderr[-3000:]  # fmt: skip
        # `ray job submit` bypasses that check; the driver's lock refuses it once the first holds it
        deadline = time.monotonic() + 300
        while "runs/.flowpp/e2e-busy/lock.json" not in bucket_keys(env, "runs/.flowpp/e2e-busy/"):
            assert time.monotonic() < deadline, ray.get_job_logs(job_id)[-3000:]
            time.sleep(1)
        out = ray_job_submit(env, *sets)
        assert out.returncode != 0 and "job e2e-busy is already running" in out.stdout + out.stderr, out.stdout[-3000:]
        assert str(ray.get_job_status(job_id)).endswith("RUNNING")
    finally:
        ray.stop_job(job_id)
        # until its workers are gone: the next test's job needs the stack's CPUs
        deadline = time.monotonic() + 120
        while not str(ray.get_job_status(job_id)).endswith(("STOPPED", "FAILED", "SUCCEEDED")):
            assert time.monotonic() < deadline, f"job {job_id} did not stop"
            time.sleep(1)


def test_ray_job_submit_runs_a_tune_search_and_registers_its_best(local_stack):
    """A search of four trials, two at a time, whose two of learning rate 1e-6 lag: ASHA stops
    laggards, each trial is a child run with its own params and curve, the printed table agrees with
    Tune's results, and the best trial by what Tune saw is registered."""
    state, env = local_stack
    sets = shrunk_demo(
        name="e2e-tune",
        train__max_steps=30,
        train__eval_every=10,
        train__eval_batches=2,
        train__ema_decay=0.9,
        tune__space={"model.num_components": {"grid": [2, 4]}, "train.lr": {"grid": [3e-3, 1e-6]}},
        tune__scheduler__max_t=30,
        tune__scheduler__grace_period=10,
        tune__scheduler__reduction_factor=2,
        mlflow__registered_model="flowpp-e2e-tune",
    )
    entrypoint = ["python", "-m", "orchestrator", "tune", "jobs/tune-mixtures.yaml", *sets]
    cmd = ["ray", "job", "submit", "--address", env["RAY_DASHBOARD"], "--working-dir", str(ROOT), "--", *entrypoint]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "search e2e-tune: 4 trials" in log and "registered flowpp-e2e-tune version 1" in log, log[-4000:]
    assert "| trial | components | lr | best val bits/dim | steps | wall time (s) | status |" in log

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("flowpp-tune").experiment_id
    (parent,) = client.search_runs([exp], "tags.`flowpp.job` = 'e2e-tune'")
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    status = {c.data.tags["flowpp.trial"]: c.data.tags["flowpp.trial_status"] for c in children}
    assert "stopped early" in status.values() and "complete" in status.values(), status
    assert "error" not in status.values()
    curves = {c.data.tags["flowpp.trial"]: client.get_metric_history(c.info.run_id, "val_bpd") for c in children}
    for c in children:  # each trial is a child run with its own params and metric curve
        assert c.data.params["model.num_components"] in ("2", "4")
        assert c.data.params["train.lr"] in ("0.003", "1e-06")  # the trial's point of the space
        assert c.data.tags["spec.model.num_components"] == c.data.params["model.num_components"]
        if status[c.data.tags["flowpp.trial"]] == "complete":
            assert curves[c.data.tags["flowpp.trial"]][-1].step == 30
    # the printed table agrees: stopped trials end before max_t in Tune's own results
    rows = [line.split(" | ") for line in log.splitlines() if line.startswith("| ") and "_0000" in line]
    assert len(rows) == 4, log[-4000:]
    assert all((int(r[4]) < 30) == (r[6].rstrip(" |") == "stopped early") for r in rows), rows

    # the search and its trials live in the job's storage path, in the bucket
    keys = bucket_keys(env, "runs/e2e-tune/")
    assert any(k.startswith("runs/e2e-tune/trials/") and k.endswith("state.pt") for k in keys), keys[:20]
    assert any(k.startswith("runs/e2e-tune/experiment_state") and k.endswith(".json") for k in keys), keys[:20]
    result_files = [k for k in keys if re.fullmatch(r"runs/e2e-tune/run_trial_[^/]+/result\.json", k)]
    results = [bucket_json_lines(env, k) for k in result_files]
    assert len(results) == 4, keys[:40]
    # trials overlapped in time: the search ran two at once, without deadlock. A trial's span, from
    # Tune's own results: its start (the first result's timestamp less the trial's running time then,
    # so worker start-up counts) to its last result. Training alone is a few seconds of a trial, so
    # spans of metric timestamps can miss trials that ran together
    spans = sorted((r[0]["timestamp"] - r[0]["time_total_s"], r[-1]["timestamp"]) for r in results)
    assert any(b_start < a_end for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)), spans
    # the best trial by what Tune saw (a stopped trial may log a step or two more to MLflow before the
    # stop reaches it): its last reported validation bits/dim
    seen = {r[-1]["trial_id"]: r[-1]["val_bpd"] for r in results}
    best = min(seen, key=seen.get)
    assert parent.data.tags["flowpp.best_trial"] == best
    version = client.get_model_version("flowpp-e2e-tune", "1")
    assert parent.data.tags["flowpp.registered_version"] == "1"
    assert version.tags["flowpp.trial"] == best and version.tags["flowpp.search"] == parent.info.run_id
    assert abs(float(version.tags["val_bpd"]) - seen[best]) < 1e-6
