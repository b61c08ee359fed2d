"""User mistakes end in one line naming the field, file or URL, and exit code 2; runtime failures in 1.

No traceback unless ``--debug``. Real components: job YAMLs on disk, a sqlite MLflow
store, an S3 endpoint on a loopback port where nothing listens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.jobs import tiny_job, write_job
from tests.s3fixtures import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr without log lines (those start with a timestamp)."""
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, "".join(line for line in err.splitlines(True) if not line[:4].isdigit())


def test_a_bad_yaml_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: [unclosed\n")
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"flowpp train: {path}: 1 problem(s) in the job spec" in err and "YAML syntax error at line" in err


def test_a_missing_manifest_names_the_url(tmp_path, capsys):
    tree = tiny_job(tmp_path, data__prepare=None)
    code, err = run_cli(["train", str(write_job(tree, tmp_path / "job.yaml"))], capsys)
    assert code == 2 and "Traceback" not in err
    url = f"file://{tmp_path}/data/train/manifest.json"
    assert err.strip() == f"flowpp train: data.train: no manifest at {url} (run `flowpp prepare` first)"


@pytest.mark.slow
def test_an_unreachable_endpoint_is_a_runtime_failure_naming_the_url(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    url = "s3://nowhere/data/valid/manifest.json"
    # `train` reaches storage before anything else (Ray, MLflow)
    tree = tiny_job(tmp_path, data__train=url, data__valid=url, storage__endpoint_url=endpoint,
                    storage__retry_budget_s=1)  # fmt: skip
    code, err = run_cli(["train", str(write_job(tree, tmp_path / "job.yaml"))], capsys)
    assert code == 1
    assert err.startswith(f"flowpp train: checking bucket of {url}: the endpoint {endpoint} is unreachable")
    assert len(err.strip().splitlines()) == 1 and "testing-secret" not in err


def test_an_unknown_model_version_names_it(tmp_path, capsys):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--model", "models:/never-registered/3", "--tracking-uri", store]
    code, err = run_cli(["sample", *args, "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("flowpp sample: models:/never-registered/3:") and len(err.strip().splitlines()) == 1
    code, err = run_cli(["promote", "--model", "never-registered", "--version", "3", "--tracking-uri", store], capsys)
    assert code == 2 and err.strip() == "flowpp promote: registered model 'never-registered' has no version 3"


def test_debug_shows_the_traceback_and_the_process_exit_code(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain: {lrr: 1}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "orchestrator"]
    plain = subprocess.run([*cmd, "train", str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert "train.lrr: Extra inputs are not permitted" in plain.stderr and "data: Field required" in plain.stderr
    debug = subprocess.run([*cmd, "--debug", "train", str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "JobSpecError" in debug.stderr


@pytest.mark.slow
def test_a_registered_model_whose_artifacts_vanished_is_one_clear_line(tmp_path, capsys):
    import shutil

    from orchestrator import tracking
    from tests.helpers import initialized_model, tiny_config

    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.ensure_run(store, "exp", "job")
    uri = tracking.log_flow_model(store, run_id, initialized_model(tiny_config(image_size=8)).float())
    version = tracking.register(store, uri, "gone", {"val_bpd": "5.0"})
    shutil.rmtree(tmp_path / "mlartifacts")  # as when the artifact store is reset under the database
    args = ["--model", f"models:/gone/{version}", "--tracking-uri", store, "--out", str(tmp_path / "x.png")]
    code, err = run_cli(["sample", *args], capsys)
    errors = [line for line in err.splitlines() if line.startswith("flowpp ")]  # not MLflow's progress bar
    assert code == 1 and errors == [
        f"flowpp sample: models:/gone/{version}: its artifacts hold no weights.safetensors "
        "(was the artifact store reset?)"
    ]


@pytest.mark.parametrize("command", ["sample", "evaluate", "promote"])
def test_a_device_this_machine_lacks_is_refused_before_any_download(tmp_path, command, capsys):
    import torch

    store = f"sqlite:///{tmp_path}/mlflow.db"
    args = {
        "sample": ["sample", "--model", "models:/m/1", "--out", str(tmp_path / "x.png")],
        "evaluate": ["evaluate", "--model", "models:/m/1", "--data", f"file://{tmp_path}/manifest.json"],
        "promote": ["promote", "--model", "m"],
    }[command]
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or the first where there is none
    code, err = run_cli([*args, "--tracking-uri", store, "--device", missing], capsys)
    assert code == 2 and "--device cuda:" in err and "Traceback" not in err, err
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched
    code, err = run_cli([*args, "--tracking-uri", store, "--device", "abacus"], capsys)
    assert code == 2 and "--device 'abacus': not a torch device" in err, err
