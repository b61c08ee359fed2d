"""A TorchTrainer from a job spec, and the driver-side steps around it.

Before any Ray resource is touched the spec has been validated (config.load_job).
The driver then makes sure the data exists (preparing the demo set if the job asks
for it), finds or creates the job's MLflow run, and runs the trainer under a
deterministic run name, so that a re-submitted job resumes from its checkpoints.
"""

from __future__ import annotations

import logging
import os

from orchestrator import storage
from orchestrator.config import JobSpec

log = logging.getLogger("flowpp.launch")


def _absolute(url: str) -> str:
    if storage.protocol_of(url) != "file":
        return url
    return "file://" + os.path.abspath(url.removeprefix("file://"))


def resolve_paths(spec: JobSpec) -> JobSpec:
    """Relative local paths made absolute here, on the driver: workers run in other directories."""
    tracking = spec.mlflow.tracking_uri
    if tracking.startswith("sqlite:///") and not tracking.startswith("sqlite:////"):
        tracking = "sqlite:///" + os.path.abspath(tracking.removeprefix("sqlite:///"))
    return spec.model_copy(
        update={
            "data": spec.data.model_copy(
                update={"train": _absolute(spec.data.train), "valid": _absolute(spec.data.valid)}
            ),
            "storage": spec.storage.model_copy(update={"path": _absolute(spec.storage.path)}),
            "mlflow": spec.mlflow.model_copy(update={"tracking_uri": tracking}),
        }
    )


def ensure_data(spec: JobSpec) -> None:
    """Prepare the job's dataset if it asks for it and its manifests are missing."""
    opts = storage.StorageOptions(endpoint_url=spec.storage.endpoint_url, region=spec.storage.region)
    for split, url in (("train", spec.data.train), ("valid", spec.data.valid)):
        storage.check_bucket(url, opts)
        if storage.object_size(url, opts) is not None:
            continue
        if spec.data.prepare is None:
            raise storage.StorageNotFoundError(f"data.{split}: no manifest at {url} (run `flowpp prepare` first)")
        from orchestrator.data.prepare import PrepareOptions, prepare

        size = spec.model.flow_config().image_size
        count = spec.data.prepare_count if split == "train" else spec.data.prepare_valid_count
        log.info(
            "preparing the %s dataset (%s, %d images at %dx%d) into %s",
            spec.data.prepare,
            split,
            count,
            size,
            size,
            url.rsplit("/", 1)[0],
        )
        prepare(
            PrepareOptions(
                source=spec.data.prepare,
                input="",
                output=url.rsplit("/", 1)[0],
                split=split,
                image_size=size,
                count=count,
                shard_bytes=4 * 2**20,
                progress=False,
            ),
            opts,
        )


def _init_ray(spec: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        # embedded: a Ray instance inside this process's session, on loopback
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            # the dashboard serves the State API, which Ray Train's placement-group cleaner needs
            # to free the resources of a run whose driver was killed (a trial ASHA stopped)
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            num_cpus=max(2, os.cpu_count() or 2),
            runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}},
        )
    else:
        ray.init()


def make_trainer(spec: JobSpec, run_id: str | None, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.train import train_loop

    opts = storage.StorageOptions(endpoint_url=spec.storage.endpoint_url, region=spec.storage.region)
    fs, path = storage.pyarrow_filesystem(spec.storage.path, opts)
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config={**spec.model_dump(), "_mlflow_run_id": run_id},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            callbacks=callbacks or None,
        ),
    )


def run_training(spec: JobSpec):
    """Prepare data if asked, run the trainer to the end, return Ray's Result."""
    spec = resolve_paths(spec)
    ensure_data(spec)
    run_id = None
    if spec.mlflow.enabled:
        from orchestrator.registry import ensure_run

        run_id = ensure_run(spec.mlflow.tracking_uri, spec.mlflow.experiment, spec.name)
        log.info("MLflow run %s in experiment %r at %s", run_id, spec.mlflow.experiment, spec.mlflow.tracking_uri)
    _init_ray(spec)
    result = make_trainer(spec, run_id).fit()
    log.info("finished: %s; checkpoint %s", result.metrics, result.checkpoint.path if result.checkpoint else None)
    return result
