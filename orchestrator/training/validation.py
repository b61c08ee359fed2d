"""Evaluation off the training workers: Ray Train validation tasks on reported checkpoints.

With ``train.eval_task`` set, the loop reports a checkpoint at each evaluation step with a request
for validation, and trains on. Ray Train runs ``validate_checkpoint`` as a task of its own
(``train.eval_task``'s CPUs and GPUs), one at a time, and merges what it returns into that
checkpoint's metrics. The task logs its figures (and a sample grid) to the run's MLflow run at the
checkpoint's step, so the curves read as if the workers had stopped to evaluate.

The last step's task also computes the final importance-weighted bound over the whole validation
split. The driver registers the model from the last checkpoint once that figure is in
(``register_validated``); a run whose final task failed or ran out of time registers nothing.

A task that fails or times out costs its figure, never the run: the task logs one line with the
error, Ray Train cancels one that runs past its ``timeout_s``, and the driver names every kept
checkpoint that asked for a figure and got none.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.config import JobSpec
from orchestrator.core.errors import FlowppError
from orchestrator.core.logs import setup_logging
from orchestrator.core.redact import without_env_vars
from orchestrator.data.stream import for_job
from orchestrator.evaluation.evaluate import evaluate, periodic_batches
from orchestrator.evaluation.images import sample_grid
from orchestrator.tracking import RunLogger
from orchestrator.training.checkpoint import load_ema_model

log = logging.getLogger(__name__)


class FinalFigureMissing(FlowppError):
    """The last checkpoint's validation task gave no final figure: no version is registered."""


REQUESTED = "eval_requested"
"""The metric a report carries when it asks for a validation task (1: periodic, 2: with the final figure)."""


def task_config(spec, step: int, final: bool):
    """The ``ray.train.ValidationTaskConfig`` of the evaluation due after ``step`` steps."""
    import ray.train

    task = spec.train.eval_task
    return ray.train.ValidationTaskConfig(fn_kwargs={"step": step, "final": final},
                                          timeout_s=task.final_timeout_s if final else task.timeout_s)  # fmt: skip


def validation_config(spec, run_id: str | None):
    """Ray Train's ``ValidationConfig`` for ``spec`` (None without ``train.eval_task``)."""
    task = spec.train.eval_task
    if task is None:
        return None
    import ray.train

    resources: dict[str, Any] = {"num_cpus": task.cpus, "max_retries": 0}
    if task.gpus:
        resources["num_gpus"] = task.gpus
    return ray.train.ValidationConfig(
        fn=validate_checkpoint,
        task_config=ray.train.ValidationTaskConfig(
            fn_kwargs={"job": without_env_vars(spec.model_dump()), "run_id": run_id}, timeout_s=task.timeout_s
        ),
        ray_remote_kwargs=resources,
    )


def validate_checkpoint(checkpoint, **kwargs: Any) -> dict:
    """Ray Train's validation function: the EMA weights of ``checkpoint`` scored on the validation
    split as the loop would score them (``val_bpd``; with ``final``, also ``val_bpd_iw``), logged to
    MLflow at ``step``; returned for the checkpoint's metrics. A failure is one line, then raised.
    ``kwargs``: ``job`` (the spec), ``run_id`` (MLflow's), ``step`` and ``final``."""
    if not logging.getLogger().handlers:  # a task's own process: its lines reach the driver's log
        setup_logging("INFO")
    spec = JobSpec.model_validate(kwargs["job"])
    step, final, run_id = int(kwargs["step"]), bool(kwargs["final"]), kwargs.get("run_id")
    started = time.perf_counter()
    try:
        figures = _score(spec, checkpoint, step, final, run_id)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        log.error("validation of the checkpoint at step %d failed: %s: %s (training goes on; this checkpoint "
                  "has no figure)", step, type(exc).__name__, first)  # fmt: skip
        raise
    log.info("step %d: validation task done in %.0f s: %s", step, time.perf_counter() - started,
             ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))  # fmt: skip
    return figures


def _score(spec, checkpoint, step: int, final: bool, run_id: str | None) -> dict[str, float]:
    import torch

    train = spec.train
    device = torch.device("cuda") if spec.train.eval_task.gpus and torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(max(1, int(spec.train.eval_task.cpus)))
    world = spec.scaling.max_workers  # the loop's share is eval_batches a rank: as many as all ranks score
    valid = for_job(spec, "valid", batch_size=spec.batching(world).micro)  # the data first: the cheaper to fail
    with checkpoint.as_directory() as directory:
        model = load_ema_model(directory, spec.model.flow_config()).to(device)
    figures = {}
    val, _ = evaluate(model, periodic_batches(valid, train.eval_batches * world), samples=train.eval_samples,
                      seed=train.seed + 12345)  # fmt: skip
    figures["val_bpd"] = float(val)
    if final:
        whole = for_job(spec, "valid", batch_size=spec.batching(world).micro, manifest=valid.manifest)
        iw, count = evaluate(model, (b["images"] for b in whole), samples=train.final_eval_samples,
                             seed=train.seed + 54321, desc="final evaluation")  # fmt: skip
        figures["val_bpd_iw"] = float(iw)
        log.info("step %d: validation bits/dim (EMA, importance-weighted, %d samples) %.4f on %d images", step,
                 train.final_eval_samples, iw, count)  # fmt: skip
    tracker = RunLogger(spec.mlflow.tracking_uri if spec.mlflow.enabled else None, run_id,
                        retry_budget_s=spec.mlflow.retry_budget_s)  # fmt: skip
    if tracker.enabled:
        tracker.metrics(figures, step)
        if train.sample_grid:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"samples-{step:08d}.png"
                sample_grid(model, train.sample_grid, path, seed=train.seed)
                tracker.image(path, "samples", step)
        left = tracker.flush()
        if left:
            log.warning("step %d: %d MLflow call(s) of the validation task were not sent", step, left)
    return figures


def register_validated(spec, run_id: str | None, result) -> str | None:
    """The driver's end of a run with ``train.eval_task``: one line for each kept checkpoint that
    asked for a figure and got none; then, if the last checkpoint has its final figure, the EMA
    model registered from it (the version), else nothing registered (None), with the reason."""
    kept = sorted(result.best_checkpoints or [], key=lambda pair: pair[1].get("step", -1))
    for _, metrics in kept:
        if metrics.get(REQUESTED) and "val_bpd" not in metrics:
            log.error("step %d: no validation figure: its task failed or ran past train.eval_task's timeout "
                      "(the lines above say which)", metrics.get("step", -1))  # fmt: skip
    if not (spec.mlflow.enabled and run_id):
        return None
    tracker = RunLogger(spec.mlflow.tracking_uri, run_id, retry_budget_s=spec.mlflow.retry_budget_s)
    if not kept:
        log.error("no checkpoint was kept: nothing to register")
        return None
    checkpoint, metrics = kept[-1]
    wanted = "val_bpd_iw" if spec.train.final_eval_samples > 1 else "val_bpd"
    if metrics.get("step") != spec.train.max_steps or wanted not in metrics:
        raise FinalFigureMissing(
            f"step {metrics.get('step')}: the final evaluation gave no {wanted} (its validation task failed, or "
            f"ran past train.eval_task.final_timeout_s={spec.train.eval_task.final_timeout_s:g} s): "
            f"{spec.mlflow.registered_model} is not registered; the run's checkpoints are kept (score the last "
            "with `flowpp evaluate`)"
        )
    if not spec.mlflow.register_model:
        tracker.finish()
        return None
    existing = tracker.registered_version()
    if existing:
        tracker.finish()
        return existing
    tags = {"val_bpd": f"{metrics['val_bpd']:.6f}", "job": spec.name}
    if "val_bpd_iw" in metrics:
        tags.update(val_bpd_iw=f"{metrics['val_bpd_iw']:.6f}", val_bpd_iw_samples=str(spec.train.final_eval_samples))
    with checkpoint.as_directory() as directory:
        model = load_ema_model(directory, spec.model.flow_config())
    version = tracker.register_model(model, spec.mlflow.registered_model, tags)
    tracker.finish()
    log.info("registered %s version %s (val bits/dim %s, importance-weighted %s)", spec.mlflow.registered_model,
             version, metrics["val_bpd"], metrics.get("val_bpd_iw"))  # fmt: skip
    return version
