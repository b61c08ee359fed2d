"""A TorchTrainer from a job spec, and the driver-side steps around it.

Before any Ray resource is touched the spec has been validated (config.load_job).
The driver then makes sure the data exists (preparing the demo set if the job asks
for it), finds or creates the job's MLflow run, and runs the trainer under a
deterministic run name, so that a re-submitted job resumes from its checkpoints.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator import tracking
from orchestrator.config import JobSpec
from orchestrator.core import storage
from orchestrator.core.errors import FlowppError, UserError
from orchestrator.core.redact import without_env_vars
from orchestrator.driver import jobstate, rayauth

log = logging.getLogger(__name__)


class TrainingFailed(FlowppError):
    """The Ray Train run failed; the message is the failing rank's own error, on one line."""


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
    """Prepare the job's dataset if it asks for it and its manifests are missing; refuse one that was
    prepared with other settings than the job's ``data.prepare*`` (another job's data, say)."""
    opts = spec.storage.options()
    for split, url in (("train", spec.data.train), ("valid", spec.data.valid)):
        storage.check_bucket(url, opts)
        found = storage.object_size(url, opts) is not None
        if not found and spec.data.prepare is None:
            raise storage.StorageNotFoundError(f"data.{split}: no manifest at {url} (run `flowpp prepare` first)")
        if spec.data.prepare is None:
            continue
        prepare_opts = _prepare_options(spec, split, url)
        if found:
            _check_prepared_alike(prepare_opts, split, url, opts)
            continue
        # lazy: PIL and webdataset, only where data is checked or prepared
        from orchestrator.data.prepare import prepare

        log.info("preparing the %s dataset (%s, %d images at %dx%d) into %s", prepare_opts.source, split,
                 prepare_opts.count, prepare_opts.image_size, prepare_opts.image_size, prepare_opts.output)  # fmt: skip
        prepare(prepare_opts, opts)
    # lazy: PIL and webdataset, only where data is checked or prepared
    from orchestrator.data.manifest import check_job_data

    check_job_data(spec)  # both manifests validated, and of the model's image size, channels and bits


def _prepare_options(spec: JobSpec, split: str, url: str):
    # lazy: PIL and webdataset, only where data is checked or prepared
    from orchestrator.data.prepare import PrepareOptions

    return PrepareOptions(
        source=spec.data.prepare or "",
        input="",
        output=url.rsplit("/", 1)[0],
        split=split,
        image_size=spec.model.flow_config().image_size,
        count=spec.data.prepare_count if split == "train" else spec.data.prepare_valid_count,
        flip=spec.data.prepare_flip,
        grey=spec.data.prepare_grey,
        shard_bytes=4 * 2**20,
        progress=False,
    )


def _check_prepared_alike(prepare_opts, split: str, url: str, opts) -> None:
    """The manifest found where the job would prepare its data must hold what the job would prepare."""
    # lazy: PIL and webdataset, only where data is checked or prepared
    from orchestrator.data.manifest import load_manifest

    # lazy: PIL and webdataset, only where data is checked or prepared
    from orchestrator.data.prepare import settings_differ

    diffs = settings_differ(prepare_opts, load_manifest(url, opts))
    if diffs:
        raise UserError(
            f"data.{split}: {url} holds data prepared with other settings than this job's data.prepare* "
            f"({'; '.join(diffs)}); point data.{split} at a folder of its own, or delete "
            f"{prepare_opts.output} to have it prepared again"
        )
    log.info("data.%s: %s holds the data this job would prepare; using it", split, url)


GCS_PORT_VAR = "RAY_GCS_SERVER_PORT"
"""Read by a Ray head as it starts: the port of its GCS (0 or unset: one of Ray's choosing)."""


def _quiet_port(host: str) -> int:
    """A free port below the kernel's range of ephemeral ports (and above Ray's worker ports), so
    that no outgoing connection of this machine is handed it between now and the bind."""
    import random

    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])  # noqa: SIM115
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(20_000, max(20_001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # none free there: any the kernel gives
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def _agent_port(port: int) -> Iterator[None]:
    """Ray's dashboard agent of the next ``ray.init`` listens on ``port`` instead of 52365. Ray sets
    that port only from ``ray start --dashboard-agent-listen-port``; for ``ray.init`` it is a default
    of ``RayParams``, put back afterwards. Two Rays with the same agent port on one machine: the
    second one's agent fails to bind, and its node dies."""
    from ray._private import parameter

    init = parameter.RayParams.__init__
    code, saved = init.__code__, init.__defaults__ or ()
    names = code.co_varnames[1 : code.co_argcount]
    if "dashboard_agent_listen_port" not in names[len(names) - len(saved) :]:
        yield  # another Ray: its own default
        return
    defaults = list(saved)
    defaults[names.index("dashboard_agent_listen_port") - (len(names) - len(saved))] = port
    init.__defaults__ = tuple(defaults)
    try:
        yield
    finally:
        init.__defaults__ = saved


@contextmanager
def own_address(host: str = "127.0.0.1") -> Iterator[dict]:
    """For a Ray started in this process: its GCS and dashboard-agent ports chosen here, and the job
    ``runtime_env`` that names its address (``RAY_ADDRESS``) in every process of the job.

    - Ray's own code in a worker that reaches the State API without an address (Ray Train's
      placement-group cleaner, which frees the resources of a run whose controller died) otherwise
      connects to the newest Ray on the machine. Beside another Ray (a second run, the local stack)
      that is the other one: its token check fails, the cleaner's thread dies, a Tune trial that ASHA
      stopped keeps its workers' CPUs reserved, and the search waits for them forever.
    - Every ``ray.init`` on a machine puts its dashboard agent on port 52365: beside another Ray,
      the second agent cannot bind, and the second Ray dies as it starts.

    Both ports are drawn below the ephemeral range (``_quiet_port``): an outgoing connection cannot
    take one between the draw and Ray's bind."""
    gcs, agent = _quiet_port(host), _quiet_port(host)
    saved = os.environ.get(GCS_PORT_VAR)
    os.environ[GCS_PORT_VAR] = str(gcs)
    try:
        with _agent_port(agent):
            yield {"env_vars": {"RAY_ADDRESS": f"{host}:{gcs}"}}
    finally:
        if saved is None:
            os.environ.pop(GCS_PORT_VAR, None)
        else:
            os.environ[GCS_PORT_VAR] = saved


def init_ray(spec: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        # embedded: a Ray instance inside this process's session, with token auth (a token
        # made for this process in a 0600 file, unless one is configured); its processes
        # inherit RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH from this environment
        rayauth.ensure_for_embedded()
        # every Ray process on loopback: Ray swaps 127.0.0.1 for the routable address (and its
        # servers then listen on every interface) unless it believes it is a one-machine cluster;
        # the processes it spawns read this variable, this one's constant was read at import
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        with own_address() as runtime_env:
            ray.init(
                # a new instance, always: with no address, ray.init joins the cluster a `ray start` of this
                # machine recorded (the local stack's, another test's) and then refuses num_cpus
                address="local",
                _node_ip_address="127.0.0.1",
                # the dashboard serves the State API, which Ray Train's placement-group cleaner needs
                # to free the resources of a run whose driver was killed (a trial ASHA stopped)
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                num_cpus=max(2, os.cpu_count() or 2),
                runtime_env=runtime_env,
            )
    else:
        ray.init()


def process_group_backend(scaling) -> str:
    """NCCL between workers that each own their GPUs; gloo on CPUs, and between workers that share a
    GPU (``scaling.gpus_per_worker`` under 1), which NCCL refuses. Gloo takes CUDA tensors too."""
    return "nccl" if scaling.use_gpu and scaling.gpus_per_worker >= 1 else "gloo"


def make_trainer(spec: JobSpec, run_id: str | None, callbacks: list | None = None, run_name: str | None = None):
    # Ray Train v2's classes (what ray.train and ray.train.torch export at run time), named where
    # their types are: those modules' stubs type them as v1's, without elastic or preemption arguments
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from orchestrator.training.loop import train_loop  # lazy: torch, for the workers
    from orchestrator.training.rendezvous import StoreOnMasterConfig  # lazy: torch
    from orchestrator.training.validation import validation_config  # lazy: torch

    fs, path = storage.pyarrow_filesystem(spec.storage.path, spec.storage.options())
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "job": without_env_vars(spec.model_dump()),  # workers get env through Ray's runtime_env
            "mlflow_run_id": run_id,
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        },
        torch_config=StoreOnMasterConfig(backend=process_group_backend(spec.scaling)),
        scaling_config=ScalingConfig(
            num_workers=(spec.scaling.min_workers, spec.scaling.max_workers)
            if spec.scaling.elastic  # elastic: Ray Train resizes the group between these
            else spec.scaling.max_workers,
            elastic_resize_monitor_interval_s=spec.scaling.resize_check_s,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name or spec.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(
                max_failures=spec.scaling.max_failures,
                max_preemption_failures=spec.scaling.preemption.max_restarts,
                preemption_grace_s=spec.scaling.preemption.grace_s,
                relax_collectives_on_preemption=spec.scaling.preemption.relax_collectives,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            callbacks=callbacks or None,
        ),
        validation_config=validation_config(spec, run_id),
    )


CONTROLLER_VARS = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S")
"""Ray Train's worker-group start timeout and its preemption watcher's poll interval: it passes
these variables of the driver's environment on to its controller."""


@contextmanager
def controller_settings(spec: JobSpec) -> Iterator[None]:
    """The job's settings for Ray Train's controller (``scaling.start_timeout_s``,
    ``scaling.preemption.poll_interval_s``), in this process's environment while it runs; put back
    afterwards."""
    values = (spec.scaling.start_timeout_s, spec.scaling.preemption.poll_interval_s)
    saved = {name: os.environ.get(name) for name in CONTROLLER_VARS}
    os.environ.update({name: f"{value:g}" for name, value in zip(CONTROLLER_VARS, values, strict=True)})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_training(spec: JobSpec, new_run: bool = False, lock: bool = True):
    """Prepare data if asked, run the trainer to the end, return Ray's Result.

    Returns None, training nothing, when the job's current run already finished at
    ``train.max_steps`` or beyond (a re-submitted job); ``new_run`` starts a fresh run instead.
    Raises ``jobstate.JobRunningError`` while another driver runs the same job, and
    ``jobstate.LockLostError`` if another driver takes the job's lock over while this one runs
    (``lock=False``, ``--no-lock``: no lock at all).
    """
    spec = resolve_paths(spec)
    with jobstate.acquire(spec) if lock else jobstate.unlocked(spec) as held:
        run = jobstate.start_new_run(spec) if new_run else jobstate.current_run(spec)
        done = jobstate.finished_step(spec, run)
        if done is not None and done >= spec.train.max_steps:
            log.info("job %s: run %s already finished at step %d (train.max_steps %d)", spec.name, run, done,
                     spec.train.max_steps)  # fmt: skip
            return None
        try:
            result = _train(spec, run)
        except BaseException:
            if held.lost.is_set():  # the lock's loss interrupted the run (Ray Train aborts it on SIGINT)
                raise jobstate.lock_lost(spec) from None
            raise
        if held.lost.is_set():  # the run ended aborted; the driver that took over owns the job's records
            raise jobstate.lock_lost(spec)
        jobstate.mark_finished(spec, run, int((result.metrics or {}).get("step", spec.train.max_steps)))
    return result


def _train(spec: JobSpec, run: str):
    """One Ray Train run named ``run`` to its end (resuming from its last checkpoint)."""
    import ray.train

    from orchestrator.training.validation import register_validated  # lazy: torch, for a run that trains

    spec = resolve_paths(spec)
    if spec.mlflow.enabled:
        tracking.check_reachable(spec.mlflow.tracking_uri)  # before any data, Ray or GPU work
    ensure_data(spec)
    run_id = None
    if spec.mlflow.enabled:
        run_id = tracking.ensure_run(spec.mlflow.tracking_uri, spec.mlflow.experiment, spec.name, train_run=run)
        log.info("MLflow run %s in experiment %r at %s", run_id, spec.mlflow.experiment,
                 tracking.public_uri(spec.mlflow.tracking_uri))  # fmt: skip
    try:
        with tracking.run_status_on_exit(spec.mlflow.tracking_uri, run_id):  # FAILED, or KILLED on SIGTERM
            init_ray(spec)
            with controller_settings(spec):
                result = make_trainer(spec, run_id, run_name=run).fit()
            if spec.train.eval_task is not None:  # the final figure came from a validation task: register here
                register_validated(spec, run_id, result)
    except ray.train.TrainingFailedError as exc:
        raise _failure(spec.name, exc) from exc
    log.info("finished: %s; checkpoint %s", result.metrics, result.checkpoint.path if result.checkpoint else None)
    return result


def _failure(name: str, exc: Exception) -> TrainingFailed:
    """The first failing rank's own error (its traceback's last line), keeping its exit code."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank, cause = min(failures.items())
        lines = [line for line in str(cause).splitlines() if line.strip()]
        error = TrainingFailed(f"training {name} failed on rank {rank}: {lines[-1].strip() if lines else cause!r}")
    else:
        cause = getattr(exc, "controller_failure", exc)
        error = TrainingFailed(f"training {name} failed: {str(cause).strip().splitlines()[-1]}")
    if isinstance(cause, FlowppError):
        error.exit_code = cause.exit_code
    return error
