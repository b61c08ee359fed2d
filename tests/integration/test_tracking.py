"""MLflow through the project: a Flow++ model logged and loaded (safetensors + code, never a
pickle), runs and experiments, sample grids as images by step, system metrics. What a short real
training run leaves in its run is checked by the e2e test of the MLflow UI, on that run."""

import pickle
import time

import numpy as np
import pytest
import torch

from flowpp import FlowPlusPlus
from orchestrator import tracking
from orchestrator.config import MlflowSpec
from tests.helpers import initialized_model, random_images, tiny_config
from tests.integration.test_mlflow_faults import Server
from tests.mlflowfixtures import image_steps
from tests.mlflowstore import fresh_sqlite
from tests.s3fixtures import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path):
    return fresh_sqlite(tmp_path / "mlflow.db")


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


@pytest.mark.slow
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


def test_a_searchs_trial_runs_end_finished_killed_or_failed_as_their_trials_did(store):
    parent = tracking.ensure_run(store, "search", "asha")
    trials = {"t1": "complete", "t2": "stopped early", "t3": "error"}
    runs = {t: tracking.ensure_run(store, "search", f"asha-{t}", parent_run_id=parent, tags={"flowpp.trial": t})
            for t in trials}  # fmt: skip
    tracking.finish_children(store, parent, trials)
    client = tracking.client_for(store)
    assert {t: client.get_run(r).info.status for t, r in runs.items()} == {
        "t1": "FINISHED", "t2": "KILLED", "t3": "FAILED"}  # fmt: skip
    assert client.get_run(runs["t2"]).data.tags["flowpp.trial_status"] == "stopped early"


# -- experiments, images, system metrics --------------------------------------------------
def test_experiments_are_model_training_experiments_new_or_made_before(store):
    kind = tracking.EXPERIMENT_KIND_TAG
    client = tracking.client_for(store)
    tracking.ensure_run(store, "fresh", "job")
    assert client.get_experiment_by_name("fresh").tags[kind] == "custom_model_development"
    before = client.create_experiment("made-before")  # by an older version, or by MLflow itself
    assert kind not in client.get_experiment(before).tags
    tracking.ensure_run(store, "made-before", "job")
    assert client.get_experiment(before).tags[kind] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={kind: "finetuning"})  # a kind a user set is kept
    tracking.ensure_run(store, "chosen", "job")
    assert client.get_experiment(chosen).tags[kind] == "finetuning"


def test_the_run_page_link_opens_the_training_view_without_credentials(store):
    page = tracking.run_page("http://bob:pa55@127.0.0.1:5000/", "3", "abc")
    assert page == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.run_page(store, "3", "abc") is None  # a local store has no UI of its own


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A real MLflow server on a loopback port (MLflow's own retries and timeout: the project's)."""
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def _png(path, value: int):
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_sample_grids_are_images_by_step_and_wait_for_a_server_that_is_away(server, tmp_path):
    run_id = tracking.ensure_run(server.uri, "images", "grids")
    logger = tracking.RunLogger(server.uri, run_id)
    logger.image(_png(tmp_path / "a.png", 10), "samples", step=10)
    assert logger.flush() == 0
    server.stop()
    grid = _png(tmp_path / "b.png", 200)
    started = time.perf_counter()
    logger.image(grid, "samples", step=20)  # an evaluation during the outage
    assert time.perf_counter() - started < 0.05  # never waits on the server
    grid.unlink()  # the trainer's temporary directory goes at once
    time.sleep(1.0)  # the sender has met the outage
    assert logger._buffer is not None and logger._buffer.pending() == 1
    server.start()
    logger.finish()
    client = tracking.client_for(server.uri)
    assert image_steps(client, run_id, "samples") == [10, 20]
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"
    from PIL import Image

    (late,) = [
        f.path for f in client.list_artifacts(run_id, "images") if "+step+20+" in f.path and f.path.endswith(".png")
    ]
    local = client.download_artifacts(run_id, late, str(tmp_path))
    assert np.asarray(Image.open(local))[0, 0].tolist() == [200, 200, 200]  # the image queued, not a later one


@pytest.mark.slow
def test_system_metrics_sample_cpu_and_memory_into_the_run_until_it_finishes(store):
    run_id = tracking.ensure_run(store, "system", "job")
    logger = tracking.RunLogger(store, run_id)
    logger.system_metrics(MlflowSpec(tracking_uri=store, system_metrics_interval_s=0.2))
    time.sleep(1.5)
    logger.finish()
    client = tracking.client_for(store)
    metrics = client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics), metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 3 and steps == sorted(set(steps))  # one sample a step, steps rising
    time.sleep(0.6)
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) == len(steps)  # stopped

    off = tracking.ensure_run(store, "system", "off")
    quiet = tracking.RunLogger(store, off)
    quiet.system_metrics(MlflowSpec(tracking_uri=store, system_metrics=False, system_metrics_interval_s=0.2))
    time.sleep(0.6)
    quiet.finish()
    assert not any(k.startswith("system/") for k in client.get_run(off).data.metrics)


def test_system_metrics_never_hold_up_a_run_whose_server_is_down(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # the project sets it
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    logger = tracking.RunLogger(uri, "0" * 32, flush_timeout_s=1.0)
    logger.system_metrics(MlflowSpec(tracking_uri=uri, system_metrics_interval_s=0.1))
    time.sleep(1.0)
    assert logger._system is not None and logger._system._thread.is_alive()  # still sampling
    assert logger._buffer is not None and logger._buffer.pending() >= 2  # the samples wait for the server
    started = time.perf_counter()
    logger.stop_system_metrics()
    assert time.perf_counter() - started < 1.0
    assert logger.flush() >= 2  # bounded: what could not be sent is counted, nothing raised
