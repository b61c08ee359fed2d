"""bench/learning_curve.py reads a run's real MLflow history (a sqlite store) into its table."""

from __future__ import annotations

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bench import learning_curve

pytestmark = pytest.mark.unit


def test_rows_are_evaluations_in_step_order_with_wall_minutes_and_last_train_bpd(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("curve", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(exp, start_time=1_000_000)
    t = lambda minutes: 1_000_000 + int(minutes * 60_000)  # noqa: E731
    metrics = [
        Metric("val_bpd", 9.0, t(0.5), 20),  # an earlier attempt's step 20, logged again below
        Metric("train_bpd", 6.0, t(1), 10),
        Metric("train_bpd", 5.0, t(2), 20),
        Metric("val_bpd", 5.5, t(2.5), 20),
        Metric("train_bpd", 4.5, t(4), 40),
        Metric("val_bpd", 4.25, t(4.5), 40),
        Metric("val_bpd_iw", 4.125, t(6), 40),
    ]
    client.log_batch(run.info.run_id, metrics=metrics)
    client.create_run(exp, start_time=2_000_000)  # a later run that logged no val_bpd is not picked
    assert learning_curve.latest_run(client, "curve") == run.info.run_id
    points = learning_curve.curve(client, run.info.run_id)
    assert [(p.step, round(p.minutes, 2), p.train_bpd, p.val_bpd) for p in points] == [
        (20, 2.5, 5.0, 5.5),
        (40, 4.5, 4.5, 4.25),
        (40, 6.0, 4.5, 4.125),
    ]
    since = learning_curve.curve(client, run.info.run_id, start_ms=t(2.2))  # only what came later
    assert [(p.step, round(p.minutes, 2), p.train_bpd) for p in since] == [
        (20, 0.3, None),
        (40, 2.3, 4.5),
        (40, 3.8, 4.5),
    ]
    lines = learning_curve.table(points)
    assert len(lines) == 5 and lines[-1].split()[:4] == ["40", "6.0", "4.5000", "4.1250"]
