"""The registered model's versions, aliases and tags: the registry calls promotion needs.

Only MLflow's own "not found" answer means a version or alias is missing; any other failure
(the server down or failing) is a ``TrackingUnavailableError`` naming the server, never "no
champion". A transient failure (the server unreachable, overloaded, a 5xx, a timeout) is retried
within ``RETRY_BUDGET_S``: MLflow's own retries are off (``connection.mlflow_for``), so this is
promotion's one retry policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.core.retry import BudgetSpent
from orchestrator.tracking.buffer import with_retries
from orchestrator.tracking.connection import (
    NOT_FOUND,
    TrackingUnavailableError,
    client_for,
    first_line,
    public_uri,
)
from orchestrator.tracking.models import ModelNotFoundError, load_flow

if TYPE_CHECKING:
    import torch


RETRY_BUDGET_S = 60.0
"""How long one registry call is retried on transient failures before promotion gives up."""


class ModelRegistry:
    """The registry calls promotion needs, on one registered model.

    Only MLflow's own "not found" answer means a version or alias is missing; any other
    failure (the server down or failing) is a ``TrackingUnavailableError``, never "no champion".
    """

    def __init__(self, tracking_uri: str, name: str, retry_budget_s: float | None = None):
        self.client = client_for(tracking_uri)
        self.tracking_uri, self.name = tracking_uri, name
        self.retry_budget_s = RETRY_BUDGET_S if retry_budget_s is None else retry_budget_s

    def _call(self, what: str, fn, *args, missing=None):
        """``fn(*args)``; MLflow's "not found" becomes ``missing()`` (raised if an exception, else returned)."""
        from mlflow.exceptions import MlflowException

        try:
            return with_retries(f"{self.name}: {what}", lambda: fn(*args), self.retry_budget_s)
        except BudgetSpent as exc:
            raise TrackingUnavailableError(
                f"{self.name}: {what} failed at the MLflow server {public_uri(self.tracking_uri)}: {exc}"
            ) from None
        except MlflowException as exc:
            if missing is not None and exc.error_code in NOT_FOUND:
                found = missing()
                if isinstance(found, Exception):
                    raise found from None
                return found
            raise TrackingUnavailableError(
                f"{self.name}: {what} failed at the MLflow server {public_uri(self.tracking_uri)}: "
                f"{first_line(exc.message)}"
            ) from None

    def version(self, version: str):
        def missing():
            return ModelNotFoundError(f"registered model {self.name!r} has no version {version}")

        return self._call(f"reading version {version}", self.client.get_model_version, self.name, str(version),
                          missing=missing)  # fmt: skip

    def latest(self):
        versions = self._call("listing versions", self.client.search_model_versions, f"name = '{self.name}'",
                              missing=list)  # fmt: skip
        if not versions:
            raise ModelNotFoundError(f"registered model {self.name!r} does not exist or has no versions")
        return max(versions, key=lambda v: int(v.version))

    def alias(self, alias: str) -> str | None:
        """The version holding ``alias``; None only when MLflow says the alias is not set."""
        mv = self._call(f"reading @{alias}", self.client.get_model_version_by_alias, self.name, alias,
                        missing=lambda: None)  # fmt: skip
        return str(mv.version) if mv is not None else None

    def set_alias(self, alias: str, version: str) -> None:
        self._call(f"setting @{alias}", self.client.set_registered_model_alias, self.name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        self._call(f"deleting @{alias}", self.client.delete_registered_model_alias, self.name, alias)

    def tags(self) -> dict:
        return self._call("reading tags", self.client.get_registered_model, self.name).tags

    def set_tag(self, key: str, value: str) -> None:
        self._call(f"setting tag {key}", self.client.set_registered_model_tag, self.name, key, value)

    def delete_tag(self, key: str) -> None:
        self._call(f"deleting tag {key}", self.client.delete_registered_model_tag, self.name, key)

    def tag_version(self, version: str, tags: dict) -> None:
        for k, v in tags.items():
            self._call(f"tagging version {version}", self.client.set_model_version_tag, self.name, version, k, str(v))

    def run_metric(self, run_id: str, key: str) -> float | None:
        """A metric of the run that produced a version (for versions registered without the tag)."""
        return (
            self._call(f"reading run {run_id}", self.client.get_run, run_id).data.metrics.get(key) if run_id else None
        )

    def run_param(self, run_id: str, key: str) -> str | None:
        return self._call(f"reading run {run_id}", self.client.get_run, run_id).data.params.get(key) if run_id else None

    def run_tag(self, run_id: str, key: str) -> str | None:
        return self._call(f"reading run {run_id}", self.client.get_run, run_id).data.tags.get(key) if run_id else None

    def load(self, version: str, device: str | torch.device = "cpu"):
        return load_flow(f"models:/{self.name}/{version}", self.tracking_uri, device)
