"""Logging and loading a Flow++ model through MLflow: safetensors + code, never a pickle."""

import pickle

import pytest
import torch

from flowpp import FlowPlusPlus
from orchestrator import tracking
from tests.helpers import initialized_model, random_images, tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def _no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    try:
        import cloudpickle

        monkeypatch.setattr(cloudpickle, "load", refuse)
        monkeypatch.setattr(cloudpickle, "loads", refuse)
    except ImportError:
        pass


def test_logged_model_loads_as_a_flow_without_pickle(store, monkeypatch):
    import mlflow

    model = initialized_model(tiny_config(image_size=8)).float()
    run_id = tracking.ensure_run(store, "exp", "job-a")
    uri = tracking.log_flow_model(store, run_id, model)
    version = tracking.register(store, uri, "reg-model", {"val_bpd": "5.5"})
    assert version == "1"

    _no_pickle(monkeypatch)
    x = random_images(3, 8)
    for loaded in (
        tracking.load_flow("models:/reg-model/1", tracking_uri=store),
        mlflow.pyfunc.load_model("models:/reg-model/1").unwrap_python_model().model,
    ):
        assert isinstance(loaded, FlowPlusPlus)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[k], v)
        torch.manual_seed(0)
        a = loaded.log_prob(x)
        torch.manual_seed(0)
        b = model.eval().log_prob(x)
        torch.testing.assert_close(a, b)
        assert loaded.sample(2).dtype == torch.uint8
    scores = mlflow.pyfunc.load_model("models:/reg-model/1").predict(x.numpy())
    assert scores.shape == (3,)
    mv = mlflow.MlflowClient().get_model_version("reg-model", "1")
    assert mv.tags["val_bpd"] == "5.5"


def test_ensure_run_resumes_unfinished_and_starts_after_finished(store):
    a = tracking.ensure_run(store, "exp", "job-b")
    assert tracking.ensure_run(store, "exp", "job-b") == a
    tracking.RunLogger(store, a).finish()
    assert tracking.ensure_run(store, "exp", "job-b") != a


def test_a_new_ray_train_run_never_reuses_the_unfinished_mlflow_run_of_the_one_before(store):
    first = tracking.ensure_run(store, "exp", "job-c", train_run="job-c")  # left RUNNING: a crashed job
    assert tracking.ensure_run(store, "exp", "job-c", train_run="job-c") == first  # re-submitted: same run
    fresh = tracking.ensure_run(store, "exp", "job-c", train_run="job-c-20261129-200000")  # --new-run
    assert fresh != first
    assert tracking.ensure_run(store, "exp", "job-c", train_run="job-c-20261129-200000") == fresh
