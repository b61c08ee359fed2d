"""A job whose model registration fails is resumed for registration alone.

Real Ray Train, real MLflow server behind a fault-injecting proxy that answers 503 to every
``model-versions/create``: the first submission trains, fails to register within
``mlflow.retry_budget_s`` and ends with its MLflow run FAILED, keeping the final checkpoint;
the second submission of the same job (the proxy healed) trains nothing and registers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from orchestrator import tracking
from tests.jobs import tiny_job, write_job
from tests.s3fixtures import FaultProxy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _steps_trained(tmp_path: Path) -> int:
    path = tmp_path / "trace" / "rank0.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if "step" in json.loads(line) and "keys" in json.loads(line))


@pytest.mark.slow
def test_a_failed_registration_is_done_by_resubmitting_without_training_again(mlflow_server, tmp_path):  # noqa: F811
    name = "resume-" + uuid.uuid4().hex[:6]
    proxy = FaultProxy(mlflow_server.uri, match="model-versions/create", failures=10**6, mode="503",
                       methods=("POST",))  # fmt: skip
    tree = tiny_job(
        tmp_path,
        train__max_steps=10,
        train__checkpoint_every=10,
        train__eval_every=10,
        train__log_every=5,
        scaling__max_failures=0,
        mlflow__tracking_uri=proxy.endpoint,
        mlflow__experiment=name,
        mlflow__registered_model=name,
        mlflow__retry_budget_s=8,
    )
    path = write_job(tree, tmp_path / "job.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # MLflow's own retries and timeout: as the project sets them
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(var, None)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "orchestrator", "train", str(path)]
    client = tracking.client_for(mlflow_server.uri)
    try:
        first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode != 0 and proxy.injected >= 1, first.stderr[-3000:]
        assert "re-submit the same job" in first.stderr and "still fails after 8 s" in first.stderr, first.stderr[
            -3000:
        ]
        run_id = tracking.find_run(mlflow_server.uri, name, tree["name"])
        assert run_id and client.get_run(run_id).info.status == "FAILED"
        assert client.search_model_versions(f"name = '{name}'") == []
        trained = _steps_trained(tmp_path)
        assert trained == 10

        proxy.remaining = 0  # the server is healthy again
        # the same job, with a budget that a loaded machine's upload of the model cannot outrun
        again = [*cmd, "--set", "mlflow.retry_budget_s=120"]
        second = subprocess.run(again, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        proxy.close()
    assert second.returncode == 0, second.stderr[-3000:]
    assert _steps_trained(tmp_path) == trained  # resumed at max_steps: registration alone
    versions = client.search_model_versions(f"name = '{name}'")
    assert [(v.run_id, v.version) for v in versions] == [(run_id, "1")]
    assert float(versions[0].tags["val_bpd"]) > 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.REGISTERED_TAG] == "1"
