"""A model as files and as an MLflow model: safetensors weights + config.json (no pickle),
logged as a pyfunc from code, registered, and loaded back from a runs:/ or models:/ URI.

Below ``runs``: the ``RunLogger`` registers through these.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core.errors import FlowppError, UserError
from orchestrator.tracking.buffer import with_retries
from orchestrator.tracking.connection import NOT_FOUND, first_line, mlflow_for

if TYPE_CHECKING:
    import torch

__all__ = [
    "PYFUNC_CODE",
    "ModelNotFoundError",
    "RegistrationError",
    "RegistrationRefusedError",
    "build_from_files",
    "load_flow",
    "log_flow_model",
    "register",
    "require_finite_val_bpd",
    "save_model_files",
    "version_of_run",
]

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")


class ModelNotFoundError(UserError):
    """A registered model, version, alias or model URI that does not exist; names it."""


class RegistrationError(FlowppError):
    """The model could not be registered; the run's final checkpoint is kept for a later try."""


class RegistrationRefusedError(RegistrationError):
    """A model whose validation bits/dim is not a finite number is never registered."""


def require_finite_val_bpd(name: str, run_id: str, tags: dict[str, Any]) -> None:
    value = tags.get("val_bpd")
    try:
        finite = math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise RegistrationRefusedError(
            f"{name}: not registered: run {run_id} has val_bpd {value!r}, not a finite number (a run that "
            "diverged or never evaluated is never a model version)"
        )


def version_of_run(client, name: str, run_id: str) -> str | None:
    """The newest version of ``name`` registered from ``run_id`` (a retry after a lost reply), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            return None
        raise
    return str(max(int(v.version) for v in versions)) if versions else None


# -- models: safetensors + config.json, logged as a pyfunc from code -----------------------
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


def build_from_files(weights: str | Path, config: str | Path, device: str | torch.device = "cpu"):
    """A FlowPlusPlus (eval mode, on ``device``) from weights.safetensors + config.json: no pickle involved."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from flowpp import FlowConfig, FlowPlusPlus  # lazy: torch

    try:
        cfg = FlowConfig.from_dict(json.loads(Path(config).read_text())).for_inference()
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FlowppError(f"{config}: not a model configuration this code reads: {first_line(exc)}") from None
    # the weights' shapes against the configuration's, on the meta device (nothing allocated): a
    # configuration that asks for more than its weights hold is refused before any memory is taken
    with safe_open(str(weights), "pt") as f:
        held = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - a safetensors handle
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in FlowPlusPlus(cfg).state_dict().items()}
    if held != wanted:
        odd = sorted(set(held) ^ set(wanted)) or [k for k in wanted if held[k] != wanted[k]]
        raise FlowppError(f"{weights}: its tensors do not fit {Path(config).name} ({len(odd)} differ, e.g. {odd[0]}); "
                          "the model files do not belong together")  # fmt: skip
    model = FlowPlusPlus(cfg).to(device)
    model.load_state_dict(load_file(str(weights), device=str(device)))
    return model.eval()


def log_flow_model(tracking_uri: str, run_id: str, model) -> str:
    """Log a FlowPlusPlus (its current weights) as an MLflow pyfunc; returns the model URI."""
    mlflow = mlflow_for(tracking_uri)
    root = Path(__file__).resolve().parents[2]  # the repository: flowpp/ and orchestrator/
    status = mlflow.MlflowClient().get_run(run_id).info.status
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.start_run(run_id=run_id)
        try:
            weights, config = save_model_files(model, Path(tmp))
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={"weights": str(weights), "config": str(config)},
                code_paths=[str(root / "flowpp"), str(root / "orchestrator")],
                pip_requirements=["torch>=2.7", "safetensors", "numpy"],  # pyproject's floor
            )
        finally:
            # not FINISHED, as leaving start_run's block would make it: a job whose registration then
            # fails must stay resumable (its run FAILED, not a finished run the next submission skips)
            mlflow.end_run(status=status)
    return info.model_uri


def register(tracking_uri: str, model_uri: str, name: str, tags: dict[str, Any]) -> str:
    """A new version of registered model ``name``; returns its version number."""
    mlflow = mlflow_for(tracking_uri)
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(mv.version)


DOWNLOAD_BUDGET_S = 60.0
"""How long a model's download is retried on transient errors (a reset connection, a 5xx)."""


def load_flow(model_uri: str, tracking_uri: str | None = None, device: str | torch.device = "cpu"):
    """FlowPlusPlus on ``device`` from a runs:/ or models:/ URI (e.g. models:/flowpp@champion), without pickle."""
    from mlflow.exceptions import MlflowException

    mlflow = mlflow_for(tracking_uri) if tracking_uri else __import__("mlflow")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # MLflow's own retries are off (connection.mlflow_for): a reset or a 5xx is retried here
            fetch = lambda: mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)  # noqa: E731
            local = Path(with_retries(f"{model_uri}: downloading its artifacts", fetch, DOWNLOAD_BUDGET_S))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ModelNotFoundError(f"{model_uri}: {first_line(exc.message)}") from None
            raise FlowppError(f"{model_uri}: cannot download its artifacts: {first_line(exc.message)}") from None
        except OSError as exc:  # the artifact store lost the files (or cannot be reached)
            raise FlowppError(f"{model_uri}: cannot download its artifacts: {first_line(str(exc))}") from None
        # where log_flow_model put them (the pyfunc's artifacts), not the first such name anywhere
        weights, config = (local / "artifacts" / name for name in ("weights.safetensors", "config.json"))
        if not weights.is_file() or not config.is_file():
            missing = "weights.safetensors" if not weights.is_file() else "config.json"
            raise FlowppError(f"{model_uri}: its artifacts hold no {missing} (was the artifact store reset?)")
        return build_from_files(weights, config, device)
