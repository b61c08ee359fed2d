"""The training loop reports through ``training.tracker.Tracker``: an in-memory implementation
sees what MLflow would (headline params, the spec as tags, job.yaml, the sample grid by step)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from flowpp import build_model
from orchestrator.config import validate
from orchestrator.training.loop import Worker, _log_run_inputs, log_samples
from orchestrator.training.trace import Trace
from orchestrator.training.tracker import MemoryTracker
from tests.jobs import tiny_job

pytestmark = pytest.mark.unit


def test_the_run_inputs_and_a_sample_grid_reach_the_tracker(tmp_path):
    spec = validate(tiny_job(tmp_path, train__sample_grid=4, train__lr=0.003))
    tracker = MemoryTracker()
    w = Worker(spec, 0, 1, torch.device("cpu"), None, tracker, Trace(None, 0))  # type: ignore[arg-type]
    manifest = {"shards": [{"url": "file:///x/0.tar", "sha256": "ab"}], "source": {"dataset": "patches"}}
    _log_run_inputs(w, SimpleNamespace(train_stream=SimpleNamespace(manifest=manifest)))  # type: ignore[arg-type]
    assert tracker.logged_params == {"model.preset": "debug", "model.num_components": "4", "train.lr": "0.003"}
    assert tracker.logged_tags["spec.train.lr"] == "0.003" and tracker.logged_tags["data.dataset"] == "patches"
    assert len(tracker.logged_tags["data.manifest_sha256"]) == 64
    assert yaml.safe_load(tracker.texts["job.yaml"])["name"] == spec.name

    torch.manual_seed(0)
    log_samples(w, build_model(spec.model.flow_config()), step=7)
    grid = Image.open(io.BytesIO(tracker.images["samples"][7]))
    assert grid.size == (2 * 16, 2 * 16)  # 4 samples of 16x16, two by two
