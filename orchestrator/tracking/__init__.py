"""MLflow, and only here: every MLflow call of the project lives in this package.

Layers, bottom first (each imports only those before it):

- ``connection``: the MLflow module and client for a URI, the URI fit for a message, reachability;
- ``buffer``: the queue that keeps training going while the server is away, retries, system
  metrics, a run's end status;
- ``models``: a model as files (safetensors + config.json, no pickle), logged as a pyfunc,
  registered, loaded back;
- ``runs``: finding and making a job's run, and the ``RunLogger`` a training run logs through;
- ``registry``: the registered model's versions, aliases and tags (what promotion needs);
- ``pyfunc``: the model class MLflow loads as code (imported by MLflow, not by the project).

May import: ``orchestrator.core``, ``orchestrator.config``, ``flowpp``.
"""

from orchestrator.tracking.buffer import MetricBuffer, SystemMetrics, end_run, run_status_on_exit, with_retries
from orchestrator.tracking.connection import (
    NOT_FOUND,
    TrackingUnavailableError,
    check_reachable,
    client_for,
    mlflow_for,
    public_uri,
)
from orchestrator.tracking.models import (
    ModelNotFoundError,
    RegistrationError,
    RegistrationRefusedError,
    build_from_files,
    load_flow,
    log_flow_model,
    register,
    save_model_files,
)
from orchestrator.tracking.runs import (
    EXPERIMENT_KIND_TAG,
    JOB_TAG,
    REGISTERED_TAG,
    TRAIN_RUN_TAG,
    RunLogger,
    ensure_run,
    find_run,
    finish_children,
    run_page,
)

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "JOB_TAG",
    "NOT_FOUND",
    "REGISTERED_TAG",
    "TRAIN_RUN_TAG",
    "MetricBuffer",
    "ModelNotFoundError",
    "RegistrationError",
    "RegistrationRefusedError",
    "RunLogger",
    "SystemMetrics",
    "TrackingUnavailableError",
    "build_from_files",
    "check_reachable",
    "client_for",
    "end_run",
    "ensure_run",
    "find_run",
    "finish_children",
    "load_flow",
    "log_flow_model",
    "mlflow_for",
    "public_uri",
    "register",
    "run_page",
    "run_status_on_exit",
    "save_model_files",
    "with_retries",
]
