"""The `tune:` section of a job spec, a trial's job, and the promotion decision rule."""

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.config import JobSpecError, load_job, validate
from orchestrator.driver.promote import PromotionError, decide
from orchestrator.driver.search import trial_spec, trials_path
from orchestrator.evaluation.evaluate import Scores

pytestmark = pytest.mark.unit

JOB = Path(__file__).resolve().parents[2] / "jobs" / "tune-mixtures.yaml"


def tree() -> dict:
    return yaml.safe_load(JOB.read_text().replace("${", "$_{"))  # keep the env defaults literal


def problems(mutate) -> list[str]:
    t = tree()
    mutate(t)
    with pytest.raises(JobSpecError) as exc:
        validate(t)
    return exc.value.problems


def test_the_search_job_searches_mixture_components_lr_and_dropout():
    spec = load_job(JOB)
    space = spec.tune.space
    assert space["model.num_components"].grid == [2, 4, 8, 16, 32]
    assert space["train.lr"].kind() == "loguniform" and space["model.dropout"].kind() == "choice"
    assert spec.tune.scheduler.time_attr == "step" and spec.tune.max_concurrent_trials >= 1
    assert spec.tune.driver_cpus < 1


def test_every_mistake_in_the_space_is_named():
    def mutate(t):
        t["tune"]["scheduler"]["time_attr"] = "training_iteration"
        t["tune"]["space"]["model.num_components"] = {"grid": [0, 4]}
        t["tune"]["space"]["train.nope"] = {"choice": [1]}
        t["tune"]["space"]["train.lr"] = {"loguniform": [1e-2, 1e-3]}
        t["tune"]["space"]["model.dropout"] = {"choice": [0.1], "grid": [0.2]}

    found = "\n".join(problems(mutate))
    assert "tune.scheduler.time_attr: training_iteration restarts at 0" in found
    assert "tune.space.model.num_components: value 0" in found
    assert "tune.space.train.nope: value 1: 'train.nope' is not a field" in found
    assert "tune.space.train.lr: loguniform needs low < high" in found
    assert "tune.space.model.dropout: give exactly one of" in found


def test_a_search_refuses_evaluations_as_validation_tasks():
    found = problems(lambda t: t["train"].update(eval_task={"cpus": 1}))
    assert any(
        p.startswith("train.eval_task: a search ranks its trials by the figure each report carries") for p in found
    )


def test_grid_values_take_the_fields_types():
    t = tree()
    t["tune"]["space"]["train.lr"] = {"grid": ["1e-6", 0.003]}  # how YAML reads 1e-6
    assert validate(t).tune.space["train.lr"].grid == [1e-6, 0.003]


def test_a_trial_runs_the_job_with_its_values_on_its_own_path():
    spec = load_job(JOB)
    trial = trial_spec(spec, {"model.num_components": 8, "train.lr": 1e-3}, "abc_00002")
    assert trial.name == "tune-mixtures-abc_00002" and trial.tune is None
    assert trial.model.num_components == 8 and trial.train.lr == 1e-3
    assert trial.scaling.num_workers == spec.tune.workers_per_trial
    assert trial.scaling.cpus_per_worker == spec.tune.cpus_per_worker
    assert trial.train.log_every == trial.train.checkpoint_every == trial.train.eval_every
    assert trial.storage.path == trials_path(spec) and trial.storage.path.startswith(spec.storage.path)
    assert not trial.mlflow.register_model
    assert spec.name == "tune-mixtures" and spec.model.num_components is None  # the search's spec is untouched


def scores(values, keys=None) -> Scores:
    values = np.asarray(values, dtype=np.float64)
    return Scores(keys or [f"k{i}" for i in range(len(values))], values)


def test_decision_rule():
    rng = np.random.default_rng(0)
    champ = 4.0 + rng.normal(0, 0.3, 400)
    clearly = decide(scores(champ - 0.05 + rng.normal(0, 0.01, 400)), scores(champ))
    assert clearly.promote and clearly.gain > clearly.margin > 0
    noisy = decide(scores(champ - 0.001 + rng.normal(0, 0.3, 400)), scores(champ))
    assert not noisy.promote and noisy.margin > abs(noisy.gain)
    worse = decide(scores(champ + 0.05), scores(champ))
    assert not worse.promote and worse.gain < 0
    fixed = decide(scores(champ - 0.05), scores(champ), margin=0.1)
    assert not fixed.promote and fixed.margin == 0.1
    first = decide(scores(champ), None)
    assert first.promote and "no champion" in first.reason
    assert not decide(scores([math.nan, 1.0]), None).promote
    with pytest.raises(PromotionError, match="same images"):
        decide(scores([1.0, 2.0], ["a", "b"]), scores([1.0, 2.0], ["a", "c"]))


def test_the_search_table_has_a_column_for_every_searched_field():
    from orchestrator.driver.search import TrialRow, format_table

    spec = load_job(JOB)  # searches num_components, lr and dropout
    rows = [
        TrialRow(
            "a_00000",
            {"model.num_components": 8, "train.lr": 1e-3, "model.dropout": 0.1},
            4.5,
            4.6,
            120,
            61.2,
            "complete",
            None,
        ),
        TrialRow(
            "a_00001",
            {"model.num_components": 2, "train.lr": 4e-3, "model.dropout": 0.0},
            5.25,
            5.3,
            30,
            15.0,
            "stopped early",
            None,
        ),
    ]
    lines = format_table(rows, spec).splitlines()
    assert lines[0] == "| trial | components | lr | dropout | best val bits/dim | steps | wall time (s) | status |"
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[2] == "| a_00000 | 8 | 0.001 | 0.1 | 4.5000 | 120 | 61 | complete |"
    assert lines[3] == "| a_00001 | 2 | 0.004 | 0.0 | 5.2500 | 30 | 15 | stopped early |"
