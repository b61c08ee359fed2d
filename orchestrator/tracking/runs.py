"""Runs: finding and making a job's MLflow run, and the ``RunLogger`` a training run logs through.

The trainer calls this from rank 0 only, through a ``RunLogger``. Values the
project needs later (a run's id, its final validation bits/dim) travel as values from
the code that produced them; they are not read back from the tracking server.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core import retry
from orchestrator.tracking.buffer import MetricBuffer, SystemMetrics, is_transient, with_retries
from orchestrator.tracking.connection import check_reachable, client_for, first_line, public_uri
from orchestrator.tracking.models import (
    RegistrationError,
    log_flow_model,
    register,
    require_finite_val_bpd,
    version_of_run,
)

if TYPE_CHECKING:
    from orchestrator.config import MlflowSpec

log = logging.getLogger(__name__)

JOB_TAG = "flowpp.job"
TRAIN_RUN_TAG = "flowpp.train_run"  # the Ray Train run (storage folder) an MLflow run logs
REGISTERED_TAG = "flowpp.registered_version"
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
"""The experiment kind MLflow's UI reads to open an experiment in its model-training view, not the GenAI one."""


# -- runs ---------------------------------------------------------------------------------
def _job_runs(client, experiment_id: str, job_name: str, max_results: int = 1) -> list:
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = '{job_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def ensure_run(
    tracking_uri: str,
    experiment: str,
    job_name: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    train_run: str | None = None,
) -> str:
    """The MLflow run of this job: the unfinished one of the same name, or a new one.

    ``parent_run_id`` makes a new run a child (a Tune trial under its search). ``train_run``, the
    Ray Train run's name, is kept as a tag: an unfinished MLflow run of another Ray Train run (the
    one before ``--new-run``) is not reused.
    """
    check_reachable(tracking_uri)
    client = client_for(tracking_uri)
    exp_id = training_experiment(client, experiment, tracking_uri)
    runs = _job_runs(client, exp_id, job_name)
    if train_run is not None:
        runs = [r for r in runs if r.data.tags.get(TRAIN_RUN_TAG, train_run) == train_run]
        tags = {**(tags or {}), TRAIN_RUN_TAG: train_run}
    if runs and runs[0].info.status != "FINISHED":
        run_id = runs[0].info.run_id
        if runs[0].info.status != "RUNNING":  # a failed or killed job, resubmitted: the same run goes on
            client.update_run(run_id, status="RUNNING")
    else:
        all_tags = {JOB_TAG: job_name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(exp_id, run_name=job_name, tags=all_tags).info.run_id
    if page := run_page(tracking_uri, exp_id, run_id):
        log.info("MLflow run page: %s", page)
    return run_id


def run_page(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of an http(s) server, without credentials; None for a local store.

    MLflow 3's UI shows an experiment in its GenAI view or its model-training view by a switch in
    its header (GenAI by default, then the browser's last choice), not by the experiment's kind:
    the link chooses model training.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    base = public_uri(tracking_uri).rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def training_experiment(client, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, made a model-training experiment: created so, or given the
    kind when it has none (one made before, or by MLflow itself). A kind already set is kept."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, _artifact_root(tracking_uri), tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if not exp.tags.get(EXPERIMENT_KIND_TAG):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def find_run(tracking_uri: str, experiment: str, job_name: str) -> str | None:
    """The newest run of this job whatever its status, or None."""
    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = _job_runs(client, exp.experiment_id, job_name) if exp else []
    return runs[0].info.run_id if runs else None


def finish_children(tracking_uri: str, parent_run_id: str, statuses: dict[str, str]) -> None:
    """Close a search's child runs: FINISHED when complete, KILLED when ASHA stopped them, FAILED on error."""
    client = client_for(tracking_uri)
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
    """One MLflow run; every method is a no-op when disabled (ranks > 0, tracking off).

    Params, metrics, text, artifacts, images and system metrics go through a ``MetricBuffer``:
    queued, sent by a background thread that retries while the server is away, flushed by
    ``finish``. Nothing the training loop calls waits on the network, except registering the
    model, which is retried for ``retry_budget_s`` seconds.
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None, retry_budget_s: float = 300.0,
                 flush_timeout_s: float = 60.0, wait_s: float = 2.0):  # fmt: skip
        self.enabled = bool(tracking_uri and run_id)
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.retry_budget_s, self.flush_timeout_s = retry_budget_s, flush_timeout_s
        self.wait_s = wait_s
        """How long ``metrics`` waits for a server that answers (0 while it does not)."""
        self._buffer: MetricBuffer | None = None
        self._system: SystemMetrics | None = None
        if tracking_uri and run_id:
            self.client = client_for(tracking_uri)

    def _queue(self) -> MetricBuffer:
        if self._buffer is None:
            assert self.run_id
            self._buffer = MetricBuffer(self.client, self.run_id)
        return self._buffer

    def params(self, params: dict) -> None:
        """Log the params this run does not have yet (a resumed run keeps its first values)."""
        if self.enabled:
            self._queue().call("params", lambda: self._send_missing("params", params))

    def tags(self, tags: dict) -> None:
        """Tag the run with the tags it does not have yet, queued like the params (first values kept)."""
        if self.enabled:
            self._queue().call("tags", lambda: self._send_missing("tags", tags))

    def _send_missing(self, kind: str, values: dict) -> None:
        """Log the ``params`` or ``tags`` the run does not have yet (first values kept), 100 a batch."""
        from mlflow.entities import Param, RunTag  # lazy: mlflow.entities loads much of MLflow

        data = self.client.get_run(self.run_id).data
        existing, entity = (data.params, Param) if kind == "params" else (data.tags, RunTag)
        new = [entity(k, str(v)) for k, v in values.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, **{kind: new[i : i + 100]})

    def metrics(self, metrics: dict, step: int) -> None:
        """Queued; sent before returning while the server answers (``wait_s`` at most), at once when it does not."""
        if self.enabled and metrics:
            self._queue().metrics(metrics, step, self.wait_s)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queued like the metrics: a copy of the file waits for the server (the caller may delete it)."""
        if not self.enabled:
            return
        import shutil

        keep = Path(tempfile.mkdtemp(prefix="flowpp-artifact-")) / Path(path).name
        shutil.copy2(path, keep)

        def send() -> None:
            self.client.log_artifact(self.run_id, str(keep), artifact_path)
            shutil.rmtree(keep.parent, ignore_errors=True)

        self._queue().call(f"artifact {keep.name}", send)

    def image(self, path: str | Path, key: str, step: int) -> None:
        """An image (a sample grid) under ``key`` at ``step``: MLflow's UI shows it with a step slider.

        Queued like an artifact; the image is read now, so the caller may delete the file.
        """
        if not self.enabled:
            return
        from PIL import Image

        with Image.open(path) as opened:
            image = opened.copy()
        at = int(time.time() * 1000)

        def send() -> None:
            self.client.log_image(self.run_id, image, key=key, step=step, timestamp=at, synchronous=True)

        self._queue().call(f"image {key} of step {step}", send)

    def system_metrics(self, spec: MlflowSpec) -> None:
        """Start sampling this machine's CPU, memory and GPUs (``mlflow.system_metrics``); ``finish`` stops it."""
        if not (self.enabled and spec.system_metrics) or self._system is not None:
            return
        assert self.run_id
        try:
            self._system = SystemMetrics(self.client, self.run_id, self._send_system, spec.system_metrics_interval_s)
        except ImportError as exc:  # psutil missing (a bare mlflow-skinny install)
            log.warning("MLflow system metrics are off: %s", exc)

    def _send_system(self, metrics: dict, step: int) -> None:
        if self.enabled:
            self._queue().metrics(metrics, step)

    def text(self, text: str, name: str) -> None:
        if self.enabled:
            self._queue().call(name, lambda: self.client.log_text(self.run_id, text, name))

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._retry(f"tagging run {self.run_id}", lambda: self.client.set_tag(self.run_id, key, value))

    def _retry(self, what: str, fn, budget_s: float | None = None):
        return with_retries(what, fn, self.retry_budget_s if budget_s is None else budget_s)

    def registered_version(self) -> str | None:
        """The model version this run already registered (a re-submitted finished job), or None."""
        if not self.enabled:
            return None
        run = self._retry(f"reading run {self.run_id}", lambda: self.client.get_run(self.run_id))
        return run.data.tags.get(REGISTERED_TAG)

    def register_model(self, model, name: str, tags: dict[str, Any]) -> str:
        """Log ``model``'s current weights as this run's pyfunc, register it; returns the version.

        Refused if ``tags["val_bpd"]`` is not finite. Each MLflow step is retried while the
        budget lasts; a run that already registered a version of ``name`` gets that one back.
        """
        assert self.enabled and self.tracking_uri and self.run_id
        uri, run_id = self.tracking_uri, self.run_id
        require_finite_val_bpd(name, run_id, tags)
        deadline = time.monotonic() + self.retry_budget_s
        what = f"registering {name} from run {run_id}"

        def step(fn):
            left = deadline - time.monotonic()
            if left <= 0:  # a later step never starts past the budget
                raise retry.BudgetSpent(f"{what}: the budget was spent before this step")
            return with_retries(what, fn, left)

        try:
            version = step(lambda: version_of_run(self.client, name, run_id))
            if version is None:
                model_uri = step(lambda: log_flow_model(uri, run_id, model))
                # each attempt looks first: a version whose reply was lost is not made twice
                version = step(lambda: version_of_run(self.client, name, run_id)
                               or register(uri, model_uri, name, {**tags, "run_id": run_id}))  # fmt: skip
            step(lambda: self.client.set_tag(run_id, REGISTERED_TAG, version))
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise RegistrationError(
                f"{what}: the MLflow server {public_uri(uri)} still fails after {self.retry_budget_s:.0f} s "
                f"(mlflow.retry_budget_s): {first_line(str(exc))}. The final checkpoint is kept: re-submit "
                "the same job (same name) to register it without training again"
            ) from None
        return version

    def flush(self) -> int:
        """Send what is queued (for at most ``flush_timeout_s``); returns the calls left unsent."""
        buffer, self._buffer = self._buffer, None
        return buffer.close(self.flush_timeout_s) if buffer else 0

    def stop_system_metrics(self) -> None:
        system, self._system = self._system, None
        if system is not None:
            system.stop()

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.stop_system_metrics()
            self.flush()
            self._retry(f"closing run {self.run_id}", lambda: self.client.set_terminated(self.run_id, status))
