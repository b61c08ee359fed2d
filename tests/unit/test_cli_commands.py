"""flowpp's conventions: --version, a bare flowpp, help with every default, validate and the
--dry-run of train, tune and submit (secrets masked, every problem listed, nothing started)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser, main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "hunter2-very-secret"
JOB = f"""
name: leaky
data:
  train: file:///tmp/nowhere/train/manifest.json
  valid: file:///tmp/nowhere/valid/manifest.json
scaling:
  num_workers: 4
  use_gpu: true
  cpus_per_worker: 6
storage:
  path: s3://runs-bucket/flowpp
mlflow:
  tracking_uri: https://alice:{PASSWORD}@mlflow.example.test
  registered_model: leaky-model
ray:
  address: http://127.0.0.1:8265
  runtime_env:
    env_vars:
      SOME_SETTING: {PASSWORD}-too
"""


@pytest.fixture
def job(tmp_path) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(JOB)
    return str(path)


def test_version_prints_the_distribution_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"flowpp {version('flowpp-orchestrator')}"


def test_a_bare_flowpp_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: flowpp") and "validate" in err and "logs" in err


def _parsers(parser: argparse.ArgumentParser, name: str = "flowpp"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_argument_has_help_and_the_help_shows_every_default():
    checked = 0
    for name, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{label}: no help"
            if not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):  # 0 is shown
                shown = f"default: {action.default}"
                assert shown in formatter._expand_help(action), f"{label}: its help does not show {shown!r}"
            checked += 1
    assert checked > 60  # every subcommand was walked


def test_validate_prints_the_resolved_spec_with_secrets_masked(job, capsys):
    assert main(["validate", job, "--set", "train.lr=0.001", "--set", "scaling.num_workers=2"]) == 0
    out = capsys.readouterr().out
    assert PASSWORD not in out
    tree = yaml.safe_load(out)
    assert tree["train"]["lr"] == 0.001 and tree["scaling"]["num_workers"] == 2  # --set applied
    assert tree["mlflow"]["tracking_uri"] == "https://***@mlflow.example.test"
    assert tree["ray"]["runtime_env"]["env_vars"] == {"SOME_SETTING": "***"}
    assert tree["train"]["max_steps"] == 300_000  # defaults filled in


def test_validate_lists_every_problem_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(JOB.replace("num_workers: 4", "num_workers: 0").replace("cpus_per_worker: 6", "cpus_per_worker: -1"))
    assert main(["validate", str(bad), "--set", "train.lr=fast"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"flowpp validate: {bad}: 3 problem(s) in the job spec"), err
    for field in ("scaling.num_workers", "scaling.cpus_per_worker", "train.lr"):
        assert field in err
    assert PASSWORD not in err


def _forbid_starting_anything(monkeypatch):
    """A dry run must not start Ray, reach a job server, MLflow or storage."""

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run started something")

    import ray
    import ray.job_submission

    from orchestrator.core import storage
    from orchestrator.driver import jobstate, launch
    from orchestrator.driver import search as tune

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)
    monkeypatch.setattr(launch, "run_training", refuse)
    monkeypatch.setattr(tune, "run_search", refuse)
    monkeypatch.setattr(jobstate, "current_run", refuse)
    monkeypatch.setattr(storage, "check_bucket", refuse)


def _plan(out: str) -> dict[str, str]:
    rows = [line.removeprefix("#   ") for line in out.splitlines() if line.startswith("#   ")]
    return {k.strip(): v.strip() for k, _, v in (row.partition(":") for row in rows)}


def test_train_dry_run_shows_the_spec_and_what_would_run(job, capsys, monkeypatch):
    _forbid_starting_anything(monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["train", job, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert PASSWORD not in out and yaml.safe_load(out)["name"] == "leaky"
    plan = _plan(out)
    assert plan["cluster"] == "embedded Ray in this process"
    assert plan["workers"] == "4 x (6 CPU, 1 GPU): 24 CPUs and 4 GPUs in all"
    assert plan["storage"] == "s3://runs-bucket/flowpp/<run name>"
    assert plan["run name"].startswith("leaky")
    assert plan["MLflow"] == "https://***@mlflow.example.test, experiment flowpp"
    assert plan["registers"] == "leaky-model"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert main(["train", job, "--dry-run"]) == 0
    assert _plan(capsys.readouterr().out)["cluster"] == "http://127.0.0.1:8265 (RAY_ADDRESS)"


def test_dry_run_of_an_elastic_job_shows_its_range_and_each_sizes_accumulation(job, capsys, monkeypatch):
    _forbid_starting_anything(monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["train", job, "--dry-run", "--set", "scaling.num_workers=[2, 4]", "--set", "train.micro_batch_size=12"]
    assert main(args) == 0
    plan = _plan(capsys.readouterr().out)
    assert plan["workers"].startswith("2 to 4 (elastic, a resize checked every 60 s); at most 4 x (6 CPU, 1 GPU)")
    assert plan["batch"] == (
        "72 global at every world size; 2 worker(s): 36 each as 3 x 12, 3 worker(s): 24 each as 2 x 12, "
        "4 worker(s): 18 each as 2 x 9"
    )


def test_submit_dry_run_names_the_cluster_and_entrypoint_and_refuses_a_credential(job, capsys, monkeypatch):
    _forbid_starting_anything(monkeypatch)
    assert main(["submit", job, "--dry-run", "--set", "train.lr=0.001", "--new-run"]) == 0
    plan = _plan(capsys.readouterr().out)
    assert plan["cluster"] == "http://127.0.0.1:8265 (ray.address), submitted as a Ray job"
    assert plan["entrypoint"] == f"python -m orchestrator train {job} --new-run --set train.lr=0.001"
    assert plan["run name"] == "leaky-<UTC time> (--new-run)"
    leak = f"mlflow.tracking_uri=https://bob:{PASSWORD}@example.test"
    assert main(["submit", job, "--dry-run", "--set", leak]) == 2
    assert "--set mlflow.tracking_uri: the value holds a credential" in capsys.readouterr().err


def test_tune_dry_run_counts_the_trials(capsys, monkeypatch):
    _forbid_starting_anything(monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["tune", str(ROOT / "jobs/tune-mixtures.yaml"), "--dry-run", "--set", "tune.num_samples=3"]) == 0
    plan = _plan(capsys.readouterr().out)
    assert plan["trials"] == "15 (3 num_samples x 5 grid points)"
    assert plan["search space"].startswith("model.num_components: grid [2, 4, 8, 16, 32]")
    assert plan["concurrency"].startswith("at most 2 trials at once")


def test_every_job_in_jobs_validates(capsys):
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        assert main(["validate", str(path)]) == 0, capsys.readouterr().err
        assert yaml.safe_load(capsys.readouterr().out)["name"]


def test_the_package_runs_as_a_module(capsys):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "orchestrator", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("flowpp ")
