"""Tiny jobs for the Ray, Tune and e2e tests: the debug preset on 16x16 demo patches, seconds a run.

``tiny_job(tmp_path, **dotted)`` is a job-spec tree that keeps everything (data, checkpoints,
MLflow store, trace) under ``tmp_path``; keyword overrides are dotted fields with ``__`` for
``.``, e.g. ``tiny_job(tmp_path, train__max_steps=40)``. ``set_args(**dotted)`` turns the same
overrides into ``--set`` arguments for a job YAML run through the CLI or ``ray job submit``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.config import apply_overrides
from tests.mlflowstore import fresh_sqlite

SHRINK_DEMO = {
    "model.image_size": 16,
    "model.stages": ["stripe:2", "s2d", "channel:2", "stripe:2"],
    "train.global_batch_size": 8,
    "train.warmup_steps": 2,
    "train.final_eval_samples": 2,
    "data.prepare_count": 128,
    "data.prepare_valid_count": 32,
}
"""What makes ``jobs/demo.yaml`` a seconds-long run (the e2e tests add their own steps)."""


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("__", "."): v for k, v in overrides.items()}


def tiny_job(tmp_path: Path, **overrides: Any) -> dict:
    data = f"file://{tmp_path}/data"
    store = f"sqlite:///{tmp_path}/mlflow.db"
    tree = {
        "name": "t-" + tmp_path.name[-12:].replace("_", "-").strip("-") or "t",
        "model": {"preset": "debug"},
        "data": {
            "train": f"{data}/train/manifest.json",
            "valid": f"{data}/valid/manifest.json",
            "prepare": "demo",
            "prepare_count": 192,
            "prepare_valid_count": 32,
            "num_workers": 1,
            "shuffle_buffer": 32,
        },
        "train": {
            "global_batch_size": 8,
            "lr": 2e-3,
            "warmup_steps": 2,
            "max_steps": 30,
            "log_every": 5,
            "checkpoint_every": 10,
            "keep_checkpoints": 2,
            "eval_every": 30,
            "eval_batches": 2,
            "sample_grid": 4,
            "final_eval_samples": 2,
            "trace_dir": str(tmp_path / "trace"),
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
        "storage": {"path": str(tmp_path / "runs")},
        "mlflow": {"tracking_uri": store, "experiment": "t", "registered_model": "t"},
    }
    tree = apply_overrides(tree, _dotted(overrides))
    if tree["mlflow"]["tracking_uri"] == store:
        fresh_sqlite(tmp_path / "mlflow.db")  # migrated already: whichever process opens it first
    return tree


def write_job(tree: dict, path: Path) -> Path:
    path.write_text(json.dumps(tree))  # JSON is YAML
    return path


def set_args(**overrides: Any) -> list[str]:
    """``--set KEY=VALUE`` pairs; values as YAML flow (JSON) so lists and strings survive."""
    out: list[str] = []
    for key, value in _dotted(overrides).items():
        out += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return out


def shrunk_demo(**overrides: Any) -> list[str]:
    """``--set`` arguments that shrink jobs/demo.yaml, plus ``overrides``."""
    return set_args(**{**{k.replace(".", "__"): v for k, v in SHRINK_DEMO.items()}, **overrides})
