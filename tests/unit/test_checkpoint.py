"""The training checkpoint format: round trip, RNG, EMA model, version refusal, no pickle."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flowpp import build_model
from flowpp.ema import EMA
from orchestrator.training import checkpoint
from orchestrator.training.loop import train_step
from orchestrator.training.state import TrainState
from tests.helpers import random_images, tiny_config

pytestmark = pytest.mark.unit


class Position:
    """A stand-in for the train stream: only its state_dict travels through a checkpoint."""

    def __init__(self, state=None):
        self.state = state or {}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def trained_state(seed: int = 0, steps: int = 2) -> TrainState:
    torch.manual_seed(seed)
    model = build_model(tiny_config(image_size=8))
    ema, opt = EMA(model, 0.5), torch.optim.Adam(model.parameters(), lr=1e-3)
    state = TrainState(model, model, ema, opt, Position({"epoch": 1, "consumed": 24}))  # type: ignore[arg-type]
    x = random_images(4, 8)
    for _ in range(steps):
        train_step(model, opt, x, lr=1e-3, grad_clip=1.0)
        ema.update(model)
        state.step += 1
    state.stats = {"nonfinite_skipped": 1, "val_bpd": 5.25}
    return state


def test_round_trip_restores_every_part_and_the_rng(tmp_path):
    saved = trained_state()
    checkpoint.save(tmp_path, saved, rank=0)
    after_save = torch.rand(3)

    torch.manual_seed(99)
    fresh = trained_state(seed=1, steps=0)
    fresh.train_stream = Position()
    checkpoint.load(tmp_path, fresh, rank=0)
    assert fresh.step == 2 and fresh.stats == saved.stats
    assert fresh.train_stream.state_dict() == {"epoch": 1, "consumed": 24}
    for k, v in saved.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[k], v)
    for k, v in saved.ema.shadow.items():
        torch.testing.assert_close(fresh.ema.shadow[k], v)
    assert fresh.opt.state_dict()["state"][0]["step"] == saved.opt.state_dict()["state"][0]["step"]
    torch.testing.assert_close(torch.rand(3), after_save)  # the RNG continues where it was saved
    assert json.loads((tmp_path / "meta.json").read_text())["format_version"] == checkpoint.FORMAT_VERSION


def test_load_ema_model_holds_the_averaged_weights(tmp_path):
    saved = trained_state()
    checkpoint.save(tmp_path, saved, rank=0)
    model = checkpoint.load_ema_model(str(tmp_path), saved.model.config)
    assert not model.training
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), saved.ema.shadow[k])
    assert any(not torch.equal(saved.ema.shadow[k], p) for k, p in saved.model.named_parameters())


def test_an_unknown_format_version_is_refused_by_name(tmp_path):
    saved = trained_state(steps=0)
    checkpoint.save(tmp_path, saved, rank=0)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "format_version": checkpoint.FORMAT_VERSION + 1}))
    with pytest.raises(checkpoint.CheckpointError, match=rf"{tmp_path}: checkpoint format version 2"):
        checkpoint.load(tmp_path, trained_state(steps=0), rank=0)
    with pytest.raises(checkpoint.CheckpointError, match="format version"):
        checkpoint.load_ema_model(str(tmp_path), saved.model.config)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_crafted_state_file_that_would_run_code_is_refused(tmp_path):
    saved = trained_state(steps=0)
    checkpoint.save(tmp_path, saved, rank=0)
    marker = str(tmp_path / "code-ran")
    torch.save({"model": _RunsCode(marker)}, tmp_path / "state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="state.pt: unreadable"):
        checkpoint.load(tmp_path, trained_state(steps=0), rank=0)
    with pytest.raises(checkpoint.CheckpointError, match="state.pt: unreadable"):
        checkpoint.load_ema_model(str(tmp_path), saved.model.config)
    assert not os.path.exists(marker)


class MoreState(TrainState):
    """Training with one more stateful object: only the state record names it."""

    scaler: Position | None = None

    def tensor_states(self):
        return {**super().tensor_states(), "scaler": self.scaler}


def test_new_state_travels_by_naming_it_in_the_state_record_alone(tmp_path):
    base = trained_state()
    saved = MoreState(base.model, base.model, base.ema, base.opt, base.train_stream, base.step, base.stats)
    saved.scaler = Position({"scale": 1024.0, "growth": 3})
    checkpoint.save(tmp_path, saved, rank=0)
    fresh = MoreState(base.model, base.model, base.ema, base.opt, Position())
    fresh.scaler = Position()
    checkpoint.load(tmp_path, fresh, rank=0)
    assert fresh.scaler.state_dict() == {"scale": 1024.0, "growth": 3}
    assert fresh.train_stream.state_dict() == {"epoch": 1, "consumed": 24} and fresh.step == 2

    plain = trained_state(steps=0)  # a checkpoint without it is refused by name, not with a KeyError
    checkpoint.save(tmp_path / "old", plain, rank=0)
    with pytest.raises(checkpoint.CheckpointError, match="no 'scaler' state"):
        checkpoint.load(tmp_path / "old", fresh, rank=0)


def test_staging_holds_at_most_its_limit_and_waits_for_the_oldest_upload(tmp_path):
    import threading
    import time

    staging = checkpoint.Staging(limit=2, root=tmp_path / "staging")
    state = trained_state(steps=1)
    first, waited_first = staging.stage(state, rank=0)
    second, waited_second = staging.stage(state, rank=0)
    assert waited_first < 0.1 and waited_second < 0.1  # room for two: no wait
    assert staging.in_flight() == [first, second] and (first / "state.pt").is_file()
    # the uploader (Ray Train's thread) deletes the first part once it is in storage, 0.3 s from now
    timer = threading.Timer(0.3, lambda: __import__("shutil").rmtree(first))
    started = time.monotonic()
    timer.start()
    third, waited = staging.stage(state, rank=0)
    assert 0.25 <= waited <= time.monotonic() - started  # it waited for room, and says so
    assert staging.in_flight() == [second, third]
    staging.close()
    assert not staging.root.exists()


def test_a_validation_task_that_fails_is_one_line_naming_its_step_then_raised(tmp_path, caplog):
    from ray.train import Checkpoint

    from orchestrator.config import validate
    from orchestrator.core.errors import FlowppError
    from orchestrator.training.validation import validate_checkpoint
    from tests.jobs import tiny_job

    checkpoint.save(tmp_path / "ckpt", trained_state(), rank=0)
    tree = tiny_job(tmp_path, train__eval_task={"cpus": 1})  # its validation split was never prepared
    with caplog.at_level("INFO"), pytest.raises(FlowppError):
        validate_checkpoint(Checkpoint.from_directory(str(tmp_path / "ckpt")), job=validate(tree).model_dump(),
                            run_id=None, step=10, final=False)  # fmt: skip
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith("validation of the checkpoint at step 10 failed: ") and "\n" not in line
    assert "valid" in line and "training goes on" in line


def test_a_restarted_ranks_staging_clears_the_parts_its_previous_attempt_never_uploaded(tmp_path, caplog, monkeypatch):
    root = tmp_path / "flowpp-staging-job-rank0"
    first = checkpoint.Staging(limit=2, root=root)
    left, _ = first.stage(trained_state(steps=1), rank=0)  # its upload never happened: the worker died
    assert left.is_dir()
    with caplog.at_level("WARNING"):
        again = checkpoint.Staging(limit=2, root=root)  # the same rank's next attempt
    assert again.in_flight() == [] and not left.exists()
    assert any("never uploaded" in r.getMessage() and left.name in r.getMessage() for r in caplog.records)
    # one folder a job, storage and rank on a node, whatever characters the job's name holds
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = checkpoint.Staging.for_rank(2, "imagenet64 spot/1", "s3://runs/a", 3).root
    assert a.parent == tmp_path and a.name.startswith("flowpp-staging-imagenet64_spot_1-") and a.name.endswith("-rank3")
    assert checkpoint.Staging.for_rank(2, "imagenet64 spot/1", "s3://runs/a", 3).root == a  # the next attempt's
    assert checkpoint.Staging.for_rank(2, "imagenet64 spot/1", "s3://runs/b", 3).root != a  # another job's
