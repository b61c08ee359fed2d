"""MLflow: tracking helpers, model logging (safetensors + code, no pickle), registration.

Every MLflow call of the project lives here; the trainer calls these from rank 0 only.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

JOB_TAG = "flowpp.job"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def _mlflow(tracking_uri: str):
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow


def ensure_run(
    tracking_uri: str,
    experiment: str,
    job_name: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """The MLflow run of this job: the unfinished one of the same name, or a new one.

    ``parent_run_id`` makes a new run a child (a Tune trial under its search).
    """
    mlflow = _mlflow(tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, _artifact_root(tracking_uri))
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{JOB_TAG}` = '{job_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs and runs[0].info.status != "FINISHED":
        return runs[0].info.run_id
    all_tags = {JOB_TAG: job_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=job_name, tags=all_tags)
    return run.info.run_id


def find_run(tracking_uri: str, experiment: str, job_name: str) -> str | None:
    """The newest run of this job whatever its status, or None."""
    client = _mlflow(tracking_uri).MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = '{job_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def finish_children(tracking_uri: str, parent_run_id: str, statuses: dict[str, str]) -> None:
    """Close a search's child runs: FINISHED when complete, KILLED when ASHA stopped them, FAILED on error."""
    client = _mlflow(tracking_uri).MlflowClient()
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    terminal = {"complete": "FINISHED", "stopped early": "KILLED", "error": "FAILED"}
    for run in children:
        status = statuses.get(run.data.tags.get("flowpp.trial", ""))
        if status:
            client.set_tag(run.info.run_id, "flowpp.trial_status", status)
        if run.info.status == "RUNNING" and status:
            client.set_terminated(run.info.run_id, terminal[status])


def _artifact_root(tracking_uri: str) -> str | None:
    """Beside a sqlite store, not in ./mlruns of whatever directory the process runs in."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None  # a tracking server decides (the local stack proxies artifacts to S3)


class RunLogger:
    """Thin wrapper around one MLflow run; a no-op when disabled (ranks > 0)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.enabled = bool(tracking_uri and run_id)
        self.run_id = run_id
        if self.enabled:
            self.client = _mlflow(tracking_uri).MlflowClient()

    def params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def metrics(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, name: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, name)

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status)


def save_model_files(model, directory: Path) -> tuple[Path, Path]:
    """weights.safetensors (float32) + config.json for a FlowPlusPlus."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights, config = directory / "weights.safetensors", directory / "config.json"
    state = {
        k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(weights))
    config.write_text(json.dumps(model.config.to_dict(), indent=1))
    return weights, config


def build_from_files(weights: str | Path, config: str | Path):
    """A FlowPlusPlus (eval mode) from weights.safetensors + config.json: no pickle involved."""
    from safetensors.torch import load_file

    from flowpp import FlowConfig, FlowPlusPlus

    cfg = FlowConfig.from_dict(json.loads(Path(config).read_text())).replace(checkpoint="none")
    model = FlowPlusPlus(cfg)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def log_flow_model(tracking_uri: str, run_id: str, model) -> str:
    """Log a FlowPlusPlus (its current weights) as an MLflow pyfunc; returns the model URI."""
    mlflow = _mlflow(tracking_uri)
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        weights, config = save_model_files(model, Path(tmp))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(weights), "config": str(config)},
            code_paths=[str(root / "flowpp"), str(root / "orchestrator")],
            pip_requirements=["torch>=2.4", "safetensors", "numpy"],
        )
    return info.model_uri


def register(tracking_uri: str, model_uri: str, name: str, tags: dict[str, str]) -> str:
    """A new version of registered model ``name``; returns its version number."""
    mlflow = _mlflow(tracking_uri)
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(mv.version)


def load_flow(model_uri: str, tracking_uri: str | None = None):
    """FlowPlusPlus from a runs:/ or models:/ URI (e.g. models:/flowpp@champion), without pickle."""
    mlflow = _mlflow(tracking_uri) if tracking_uri else __import__("mlflow")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        weights = next(local.rglob("weights.safetensors"))
        config = next(local.rglob("config.json"))
        return build_from_files(weights, config)
