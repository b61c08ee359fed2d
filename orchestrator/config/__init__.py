"""The job spec: its typed tree, loading (YAML, ``${VAR}`` expansion, dotted ``--set``),
validation, the search space and the learning-rate schedule.

Modules, bottom first: ``env`` (which environment variables a spec may read, and their
expansion), ``schedule`` (the learning rate of each step, from numbers), ``spec`` (the tree),
``load`` (YAML, ``--set``, validation and the checks across fields).

May import: ``orchestrator.core`` and, lazily where a field needs it, ``flowpp``.
"""

from orchestrator.config.load import JobSpecError, apply_overrides, load_job, override_problems, validate
from orchestrator.config.schedule import Rates, ScheduleSpec, learning_rate
from orchestrator.config.spec import (
    DataSpec,
    JobSpec,
    MlflowSpec,
    ModelSpec,
    RaySpec,
    ScalingSpec,
    StorageSpec,
    TrainSpec,
    TuneSpec,
)
from orchestrator.core.redact import flatten, headline_params, public_params, redact_tree, spec_tags

__all__ = [
    "DataSpec",
    "JobSpec",
    "JobSpecError",
    "MlflowSpec",
    "ModelSpec",
    "RaySpec",
    "Rates",
    "ScalingSpec",
    "ScheduleSpec",
    "StorageSpec",
    "TrainSpec",
    "TuneSpec",
    "apply_overrides",
    "flatten",
    "headline_params",
    "learning_rate",
    "load_job",
    "override_problems",
    "public_params",
    "redact_tree",
    "spec_tags",
    "validate",
]
