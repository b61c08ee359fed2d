"""Progress bars with images/s on stderr for evaluation, scoring and sampling; off on request,
and quiet in a log for a loop shorter than the log interval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowpp import FlowPlusPlus
from flowpp.distributed import data_dependent_init
from orchestrator.core import progress
from orchestrator.core.errors import UserError
from orchestrator.evaluation.evaluate import evaluate, per_image_bpd
from orchestrator.evaluation.images import sample_images
from tests.helpers import random_images, tiny_config

pytestmark = pytest.mark.unit


def model_of(seed: int = 0) -> FlowPlusPlus:
    torch.manual_seed(seed)
    model = FlowPlusPlus(tiny_config(image_size=8))
    data_dependent_init(model, random_images(8, 8, 256, seed))
    return model.eval()


BATCHES = [random_images(3, 8, seed=s).to(torch.uint8) for s in (1, 2, 3)]


def test_evaluate_shows_images_and_their_rate_on_stderr(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "on")
    _, count = evaluate(model_of(), BATCHES, samples=1, seed=0, desc="final eval", total=9)
    out, err = capsys.readouterr()
    assert count == 9 and out == ""
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("final eval: 100%") and "9/9" in last and "img/s" in last, err


@pytest.mark.parametrize("env", [{progress.ENV: "off"}, {"TQDM_DISABLE": "1"}])
def test_the_bar_is_off_with_flowpp_progress_off_or_tqdm_disable(env, monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "on")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert evaluate(model_of(), BATCHES, samples=1, seed=0)[1] == 9
    assert capsys.readouterr().err == ""


def test_in_a_log_a_short_loop_prints_nothing_and_a_long_one_plain_lines(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)  # auto; capsys's stderr is not a terminal
    evaluate(model_of(), BATCHES, samples=1, seed=0)
    assert capsys.readouterr().err == ""  # shorter than LOG_INTERVAL_S
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    evaluate(model_of(), BATCHES, samples=1, seed=0, total=9)
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    assert err.splitlines()[-1].startswith("evaluate: 100%") and "9/9" in err and "img/s" in err


def test_an_unknown_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(progress.ENV, "loud")
    with pytest.raises(UserError, match="FLOWPP_PROGRESS='loud': must be one of auto, on, off"):
        progress.bar("x")


def test_sampling_in_chunks_gives_model_sample_and_counts_every_image(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "on")
    model = model_of()
    images = sample_images(model, 20, seed=3, desc="sample")  # 16 + 4
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        expected = model.sample(20, generator=gen).numpy()
    assert images.dtype == np.uint8 and np.array_equal(images, expected)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("sample: 100%") and "20/20" in last and "img/s" in last


def test_per_image_scoring_counts_to_the_split_size(tmp_path, monkeypatch, capsys):
    from orchestrator.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(source="demo", input="", output=str(tmp_path), count=20, image_size=8, progress=False))
    capsys.readouterr()
    monkeypatch.setenv(progress.ENV, "on")
    scores = per_image_bpd(model_of(), f"file://{tmp_path}/manifest.json", batch_size=8, desc="candidate demo v2")
    assert len(scores.bpd) == 20
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("candidate demo v2: 100%") and "20/20" in last and "img/s" in last
    per_image_bpd(model_of(), f"file://{tmp_path}/manifest.json", max_images=5)
    assert "5/5" in capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]


MLFLOW_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _download_with_mlflow(tmp_path) -> str:
    """Log a file to a real local MLflow store and download it the way flowpp promote does."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("bars", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    (tmp_path / "w.txt").write_text("weights")
    client.log_artifact(run.info.run_id, str(tmp_path / "w.txt"), "model")
    return client.download_artifacts(run.info.run_id, "model", str(tmp_path / "down"))


@pytest.mark.parametrize(("mode", "shown"), [("auto", False), ("off", False), ("on", True)])
def test_mlflows_download_bar_follows_the_progress_choice(tmp_path, monkeypatch, capsys, mode, shown):
    """stderr is not a terminal here (a log): MLflow's bar, one line of carriage returns there, shows
    only where ours would be live."""
    monkeypatch.setenv(MLFLOW_BAR, "unset")
    monkeypatch.delenv(MLFLOW_BAR)  # restored to its state before the test afterwards
    monkeypatch.setenv(progress.ENV, mode)
    progress.govern_libraries()
    _download_with_mlflow(tmp_path)
    assert ("Downloading artifacts" in capsys.readouterr().err) is shown


def test_a_library_switch_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv(MLFLOW_BAR, "true")
    monkeypatch.setenv(progress.ENV, "off")
    progress.govern_libraries()
    assert progress.os.environ[MLFLOW_BAR] == "true"
