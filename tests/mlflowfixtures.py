"""A real MLflow tracking server for tests: sqlite backend, artifacts proxied to the moto S3
bucket, on 127.0.0.1, started and stopped by pid (its own process group)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3fixtures import ACCESS_KEY, SECRET, _wait_http, free_port


@dataclass
class MlflowServer:
    uri: str
    bucket: str
    s3_endpoint: str


SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
"""The environment of every MLflow server the tests start, as the local stack and the cluster's run
theirs: without MLflow's job runner (its GenAI jobs, which the project never submits), whose
consumers are eight more processes importing MLflow, about 25 CPU-seconds each start."""


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    import boto3

    bucket = "mlflow-" + uuid.uuid4().hex[:10]
    creds = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    state = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, **creds, **SERVER_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{state}/mlflow.db",
           "--artifacts-destination", f"s3://{bucket}/mlflow", "--serve-artifacts"]  # fmt: skip
    log = open(state / "server.log", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        yield MlflowServer(f"http://127.0.0.1:{port}", bucket, s3_endpoint)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own group: its workers, nobody else
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def run_train(path: Path, cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600):
    """``python -m orchestrator train PATH ARGS`` in a fresh process (its own local Ray), from ``cwd``."""
    root = Path(__file__).resolve().parents[1]
    full = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    full.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "orchestrator", "train", str(path), *args]
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def image_steps(client, run_id: str, key: str) -> list[int]:
    """The steps of the images ``log_image`` wrote under ``key`` (images/KEY+step+N+timestamp+...png)."""
    import re

    found = (re.fullmatch(rf"images/{re.escape(key)}\+step\+(\d+)\+timestamp\+\d+\+[-\w]+\.png", f.path)
             for f in client.list_artifacts(run_id, "images"))  # fmt: skip
    return sorted(int(m.group(1)) for m in found if m)
