"""Bits/dim against wall time, from one training run's MLflow history.

    python bench/learning_curve.py --tracking-uri sqlite:///runs/mlflow.db \\
        --experiment flowpp-demo-long [--run-id ID] [--baseline-data MANIFEST_URL]

Every periodic evaluation of the run (``val_bpd``: the EMA weights on ``train.eval_batches`` of
the validation split) is a row: its step, the minutes since the run started, the last training
bits/dim logged at or before it, and the validation bits/dim. The final importance-weighted bound
(``val_bpd_iw``, the whole split) is the last row. With ``--baseline-data`` it also prints PNG's
and WebP-lossless's bits/dim on the same split, so the curve can be read against them.

The run is ``--run-id``, or the latest run of ``--experiment`` that logged ``val_bpd``. Wall time
is measured from the run's start as MLflow recorded it (the driver's clock), so it includes the
data-dependent init, evaluations and checkpoints: what a user waits for. A step logged twice (a
run resumed from a checkpoint logs the steps after it again) shows its latest value; ``--start``
moves the origin and drops what was logged before it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Point:
    step: int
    minutes: float
    train_bpd: float | None
    val_bpd: float
    what: str


def _latest(history, since: int) -> list:
    """One entry per step, logged at or after ``since`` (ms): the latest, so that a run that was
    restarted (it logs the steps after its checkpoint again) shows its last attempt."""
    last: dict = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        if m.timestamp >= since:
            last[m.step] = m
    return [last[k] for k in sorted(last)]


def curve(client, run_id: str, start_ms: int | None = None) -> list[Point]:
    """The run's evaluations in step order, then its importance-weighted bound if it logged one.
    Wall time counts from ``start_ms`` (default: the run's start); entries before it are ignored."""
    run = client.get_run(run_id)
    start = run.info.start_time if start_ms is None else start_ms
    train = [(m.step, m.value) for m in _latest(client.get_metric_history(run_id, "train_bpd"), start)]

    def last_train(step: int) -> float | None:
        seen = [v for s, v in train if s <= step]
        return seen[-1] if seen else None

    points = [
        Point(m.step, (m.timestamp - start) / 60_000, last_train(m.step), m.value, "val_bpd (EMA)")
        for m in _latest(client.get_metric_history(run_id, "val_bpd"), start)
    ]
    points += [
        Point(m.step, (m.timestamp - start) / 60_000, last_train(m.step), m.value, "val_bpd_iw (whole split)")
        for m in _latest(client.get_metric_history(run_id, "val_bpd_iw"), start)
    ]
    return points


def latest_run(client, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} at this tracking URI")
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=50):
        if "val_bpd" in run.data.metrics:
            return run.info.run_id
    raise SystemExit(f"no run of experiment {experiment!r} logged val_bpd")


def table(points: list[Point], baselines: list = ()) -> list[str]:
    lines = [
        f"{'step':>6}  {'wall min':>8}  {'train bpd':>9}  {'val bpd':>8}  what",
        f"{'-' * 6}  {'-' * 8}  {'-' * 9}  {'-' * 8}  {'-' * 24}",
    ]
    for p in points:
        train = f"{p.train_bpd:9.4f}" if p.train_bpd is not None else f"{'-':>9}"
        lines.append(f"{p.step:>6}  {p.minutes:8.1f}  {train}  {p.val_bpd:8.4f}  {p.what}")
    for b in baselines:
        lines.append(f"{'':>6}  {'':>8}  {'':>9}  {b.bpd:8.4f}  {b.codec} ({b.images} images)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True, help="MLflow tracking URI of the run")
    ap.add_argument("--experiment", help="the latest run of this experiment that logged val_bpd")
    ap.add_argument("--run-id", help="this run instead")
    ap.add_argument("--baseline-data", help="manifest URL of the validation split: also print PNG and WebP")
    ap.add_argument(
        "--start",
        help="wall time counts from this UTC time (2026-11-30T03:17:53), and only what was logged since "
        "is shown: for a run restarted from scratch under the same name (default: the run's start)",
    )
    args = ap.parse_args(argv)
    if not (args.run_id or args.experiment):
        ap.error("give --run-id or --experiment")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    run_id = args.run_id or latest_run(client, args.experiment)
    baselines = []
    if args.baseline_data:
        from orchestrator.evaluation.baselines import score_codecs

        baselines = score_codecs(args.baseline_data, ["png", "webp"], desc="baselines")
    start_ms = None
    if args.start:
        from datetime import datetime, timezone

        start_ms = int(datetime.fromisoformat(args.start).replace(tzinfo=timezone.utc).timestamp() * 1000)
    print(f"run {run_id}")
    print("\n".join(table(curve(client, run_id, start_ms), baselines)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
