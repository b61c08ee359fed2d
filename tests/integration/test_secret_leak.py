"""A fake secret through a real run, and a search for it everywhere the run leaves text.

The secret arrives the three ways a real one does: a credential variable in the environment
(``SERVICE_TOKEN``, passed on in ``ray.runtime_env.env_vars`` by an ``env_allow`` entry), the
password of the MLflow tracking URI (``http://flowpp:PASSWORD@...``, from ``FLOWPP_TRACKING``,
whose name says nothing), and the AWS secret key of the environment (tests.s3fixtures.SECRET).
The job YAML goes through ``load_job``; the run is a real Ray Train run (one worker, the debug
preset on 16x16 patches) against a real MLflow server that proxies artifacts to the moto S3.

Searched: everything the process and Ray's workers printed, Ray's session logs, the Ray Train
storage folder, the MLflow server's database file and log, and every param, tag, artifact and
registered-model version of the run, as the MLflow API returns them.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_job
from orchestrator.core.logs import setup_logging
from tests.jobs import tiny_job
from tests.rayauth import token_auth
from tests.rayfixtures import local_ray
from tests.s3fixtures import SECRET

pytestmark = pytest.mark.integration

TOKEN = "tok-" + uuid.uuid4().hex
PASSWORD = "pw-" + uuid.uuid4().hex


@pytest.fixture
def ray_with_secrets(monkeypatch, aws_env, tmp_path):
    """Ray started with the secrets in its environment, as the workers of a real job have them."""
    import ray

    monkeypatch.setenv("SERVICE_TOKEN", TOKEN)
    auth = token_auth(tmp_path)
    with local_ray(num_cpus=2):
        yield Path(ray._private.worker._global_node.get_session_dir_path())
    auth.restore()


@pytest.fixture
def fresh_root():
    """The root logger as a fresh process has it (pytest's capture handlers put back afterwards)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    setup_logging("INFO")
    yield root
    root.handlers, root.level = saved, level


def _job_yaml(tmp_path: Path) -> Path:
    tree = tiny_job(
        tmp_path,
        scaling__num_workers=1,
        train__max_steps=10,
        train__log_every=5,
        train__checkpoint_every=10,
        train__eval_every=10,
        train__sample_grid=2,
        mlflow__experiment="leak-" + uuid.uuid4().hex[:8],
        mlflow__registered_model="leak-" + uuid.uuid4().hex[:8],
    )
    tree["mlflow"]["tracking_uri"] = "${FLOWPP_TRACKING}"
    tree["ray"] = {
        "runtime_env": {"env_vars": {"SERVICE_TOKEN": "${SERVICE_TOKEN}", "FLOWPP_TRACKING": "${FLOWPP_TRACKING}"}}
    }
    tree["env_allow"] = ["SERVICE_TOKEN"]
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _leaks(text: str | bytes, where: str) -> list[str]:
    blob = text if isinstance(text, bytes) else text.encode()
    return [f"{name} in {where}" for name, value in (("TOKEN", TOKEN), ("PASSWORD", PASSWORD), ("SECRET", SECRET))
            if value.encode() in blob]  # fmt: skip


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()] if root.exists() else []


def _mlflow_texts(uri: str, experiment: str, model: str, dst: Path) -> dict[str, str | bytes]:
    """Every param, tag, artifact file and registered version of the experiment, by where it was found."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, str | bytes] = {}
    for run in client.search_runs([exp.experiment_id]):
        rid = run.info.run_id
        out[f"run {rid} params"] = repr(run.data.params)
        out[f"run {rid} tags"] = repr(run.data.tags)
        out[f"run {rid} metric names"] = repr(sorted(run.data.metrics))
        local = Path(download_artifacts(run_id=rid, artifact_path="", dst_path=str(dst / rid), tracking_uri=uri))
        for f in _files(local):
            out[f"run {rid} artifact {f.relative_to(local)}"] = f.read_bytes()
    for mv in client.search_model_versions(f"name = '{model}'"):
        out[f"model version {mv.version}"] = repr((mv.tags, mv.source, mv.run_link, mv.description))
    out["registered model"] = repr(client.get_registered_model(model).tags) if out else ""
    return out


@pytest.mark.slow
def test_a_fake_secret_reaches_no_log_param_tag_or_artifact(
    tmp_path,
    tmp_path_factory,
    monkeypatch,
    capfd,
    mlflow_server,  # noqa: F811
    ray_with_secrets,
    fresh_root,
):
    from orchestrator.driver.launch import run_training

    authed = mlflow_server.uri.replace("http://", f"http://flowpp:{PASSWORD}@")
    monkeypatch.setenv("FLOWPP_TRACKING", authed)
    spec = load_job(_job_yaml(tmp_path))
    assert spec.mlflow.tracking_uri == authed and spec.ray.runtime_env["env_vars"]["SERVICE_TOKEN"] == TOKEN
    logging.getLogger("orchestrator.test").info("tracking at %s, token %s", authed, os.environ["SERVICE_TOKEN"])

    result = run_training(spec)
    assert result.metrics["step"] == 10

    printed = capfd.readouterr()
    log = printed.out + printed.err
    assert f"tracking at http://***@127.0.0.1:{mlflow_server.uri.rsplit(':', 1)[1]}, token ***" in log
    assert re.search(r"MLflow run \w+ in experiment '[\w-]+' at http://(\*\*\*@)?127\.0\.0\.1:", log), log
    texts: dict[str, str | bytes] = {"driver and worker output": log}
    texts.update(_mlflow_texts(authed, spec.mlflow.experiment, spec.mlflow.registered_model, tmp_path / "dl"))
    assert any(k.endswith("artifact job.yaml") for k in texts), sorted(texts)
    job_yaml = next(v for k, v in texts.items() if k.endswith("artifact job.yaml"))
    assert b"tracking_uri: http://***@127.0.0.1" in job_yaml  # the artifact is there, masked
    for f in _files(ray_with_secrets / "logs") + _files(tmp_path / "runs") + _files(tmp_path / "trace"):
        texts[str(f)] = f.read_bytes()
    for f in tmp_path_factory.getbasetemp().glob("mlflow-server*/*"):  # the server's database and log
        texts[str(f)] = f.read_bytes()
    leaks = [leak for where, text in texts.items() for leak in _leaks(text, where)]
    assert not leaks, leaks
