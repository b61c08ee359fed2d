"""Looking at jobs without running them, and at submitted jobs: ``flowpp validate``, the
``--dry-run`` of train, tune and submit, and ``flowpp logs|status|stop`` (Ray's
``JobSubmissionClient``, which reads ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN_PATH`` itself)."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

from orchestrator.core.errors import FlowppError, UserError
from orchestrator.core.redact import redact, redact_tree

if TYPE_CHECKING:
    from orchestrator.config import JobSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# -- validate and --dry-run ---------------------------------------------------------------
def resolved_yaml(spec: JobSpec) -> str:
    """The spec after ``${VAR}`` and ``--set``, as YAML, with every secret masked."""
    import yaml

    return yaml.safe_dump(redact_tree(spec.model_dump()), sort_keys=False)


def cmd_validate(args) -> int:
    from orchestrator.config import load_job  # lazy: flowpp --help loads only what it shows

    print(resolved_yaml(load_job(args.job, args.set or [])), end="")
    return 0


def dry_run(spec: JobSpec, command: str, args) -> int:
    """``flowpp COMMAND --dry-run``: the resolved spec and what would run; nothing is started."""
    print(resolved_yaml(spec), end="")
    print(f"\n# flowpp {command} --dry-run: nothing started. It would run:")
    for name, value in plan(spec, command, args):
        print(f"#   {name + ':':<16}{value}")
    return 0


def plan(spec: JobSpec, command: str, args) -> list[tuple[str, str]]:
    """(what, value) lines: where it would run, on what, and where it would write."""
    rows: list[tuple[str, str]] = []
    if command == "submit":
        # lazy: flowpp --help loads only what it shows
        from orchestrator.driver.submit import check_submittable, entrypoint

        check_submittable(spec, args.set or [])
        rows.append(("cluster", f"{redact(str(spec.ray.address))} (ray.address), submitted as a Ray job"))
        rows.append(("entrypoint", redact(entrypoint(args.job, args.set or [], args.new_run))))
    else:
        where = os.environ.get("RAY_ADDRESS")
        rows.append(("cluster", f"{redact(where)} (RAY_ADDRESS)" if where else "embedded Ray in this process"))
    if command == "tune":
        rows += _tune_rows(spec)
    else:
        rows += _train_rows(spec, getattr(args, "new_run", False))
    mlflow = spec.mlflow
    if mlflow.enabled:
        registers = mlflow.registered_model if mlflow.register_model else "(none)"
        rows.append(("MLflow", f"{redact(mlflow.tracking_uri)}, experiment {mlflow.experiment}"))
        rows.append(("registers", registers if command != "tune" or spec.tune is None or spec.tune.register_best
                     else "(none: tune.register_best is off)"))  # fmt: skip
    else:
        rows.append(("MLflow", "off (mlflow.enabled: false)"))
    rows.append(("data", f"{redact(spec.data.train)} (train), {redact(spec.data.valid)} (valid)"))
    return rows


def _resources(workers: int, cpus: float, gpu: bool) -> str:
    gpus = f"1 GPU, {workers} GPUs" if gpu else "no GPU, 0 GPUs"
    each, all_gpus = gpus.split(", ")
    return f"{workers} x ({cpus:g} CPU, {each}): {workers * cpus:g} CPUs and {all_gpus} in all"


def _train_rows(spec: JobSpec, new_run: bool) -> list[tuple[str, str]]:
    s = spec.scaling
    run = f"{spec.name}-<UTC time> (--new-run)" if new_run else f"{spec.name}, or the run the last --new-run began"
    workers = _resources(s.max_workers, s.cpus_per_worker, s.use_gpu)
    if s.elastic:
        elastic = f"{s.min_workers} to {s.max_workers} (elastic, a resize checked every {s.resize_check_s:g} s)"
        workers = f"{elastic}; at most {workers}"
    return [
        ("workers", workers),
        ("batch", f"{spec.train.global_batch_size} global at every world size; " + _batch_sizes(spec)),
        ("data order", _data_order(spec)),
        ("steps", f"{spec.train.max_steps}"),
        ("checkpoints", _checkpoints(spec)),
        ("evaluation", _evaluation(spec)),
        ("run name", run),
        ("storage", f"{redact(spec.storage.path)}/<run name>"),
    ]


def _checkpoints(spec: JobSpec) -> str:
    t = spec.train
    how = (f"uploaded in the background, at most {t.max_uploads_in_flight} in flight (train.async_uploads)"
           if t.async_uploads else "each step waits for its upload (train.async_uploads: false)")  # fmt: skip
    return f"every {t.checkpoint_every} steps, the last {t.keep_checkpoints} kept; {how}"


def _evaluation(spec: JobSpec) -> str:
    t, task = spec.train, spec.train.eval_task
    final = f"; final bound with {t.final_eval_samples} samples an image" if t.final_eval_samples > 1 else ""
    if task is None:
        return f"every {t.eval_every} steps, in the training loop{final}"
    gpus = f", {task.gpus:g} GPU" if task.gpus else ""
    limits = f"timeout {task.timeout_s:g} s, final {task.final_timeout_s:g} s"
    return (f"every {t.eval_every} steps, as validation tasks of {task.cpus:g} CPU{gpus} ({limits}){final}; "
            "the version is registered once the final figure is in")  # fmt: skip


def _batch_sizes(spec: JobSpec) -> str:
    """Each world size's share of the global batch, and its micro-batches where it takes several:
    ``2 workers: 36 each as 3 x 12``."""
    out = []
    for world in range(spec.scaling.min_workers, spec.scaling.max_workers + 1):
        b = spec.batching(world)
        out.append(f"{world} worker(s): {b.per_worker} each" + (f" as {b.steps} x {b.micro}" if b.steps > 1 else ""))
    return ", ".join(out)


def _data_order(spec: JobSpec) -> str:
    """The training epoch's strands (``orchestrator/data/plan.py``), which every world size shares."""
    from orchestrator.data.plan import job_strands  # lazy: numpy, for this row alone

    strands = job_strands(spec)
    each = spec.train.global_batch_size // strands
    return (f"the epoch in {strands} strands, {each} image(s) from each a step: the same images at a step "
            "at every world size")  # fmt: skip


def _tune_rows(spec: JobSpec) -> list[tuple[str, str]]:
    import math

    tune = spec.tune
    assert tune is not None  # cmd_tune refuses a spec without one first
    grid = math.prod(len(d.grid or []) for d in tune.space.values() if d.kind() == "grid")
    space = "; ".join(f"{k}: {d.kind()} {getattr(d, d.kind())}" for k, d in tune.space.items())
    per_trial = tune.workers_per_trial * tune.cpus_per_worker + tune.driver_cpus
    return [
        ("trials", f"{tune.num_samples * grid} ({tune.num_samples} num_samples x {grid} grid points)"),
        ("search space", space),
        ("concurrency", f"at most {tune.max_concurrent_trials} trials at once, {per_trial:g} CPUs each"),
        ("per trial", _resources(tune.workers_per_trial, tune.cpus_per_worker, spec.scaling.use_gpu)),
        (
            "ASHA",
            f"on {tune.metric} by {tune.scheduler.time_attr}, max_t {tune.scheduler.max_t}, "
            f"grace {tune.scheduler.grace_period}",
        ),  # fmt: skip
        ("storage", f"{redact(spec.storage.path)}/{spec.name}"),
    ]


# -- logs, status, stop -------------------------------------------------------------------
def client(address: str | None):
    """A JobSubmissionClient for ``address`` (default: RAY_ADDRESS, else ``DEFAULT_ADDRESS``); an
    unreachable or refusing server in one line."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address)
    except ConnectionError:
        raise FlowppError(f"the Ray job server at {redact(address)} is unreachable (is the cluster up?)") from None
    except AuthenticationError:
        raise UserError(
            f"the Ray job server at {redact(address)} refused this client's token: set RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN_PATH to the cluster's token file"
        ) from None


def job_info(jobs, job_id: str):
    """The job's details; an unknown id is a user mistake naming it."""
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as exc:
        if "status code 404" in str(exc):
            raise UserError(f"no job {job_id} on the Ray cluster at {redact(jobs.get_address())}") from None
        raise FlowppError(f"job {job_id}: {redact(str(exc).strip().splitlines()[0])}") from None


def _status(info) -> str:
    return str(info.status).rsplit(".", 1)[-1]


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000)) if ms else "-"


def cmd_status(args) -> int:
    jobs = client(args.address)
    info = job_info(jobs, args.job_id)
    print(f"job {args.job_id}: {_status(info)}")
    print(f"  entrypoint: {redact(info.entrypoint or '-')}")
    print(f"  started:    {_when(info.start_time)}")
    print(f"  ended:      {_when(info.end_time)}")
    print(f"  message:    {redact(info.message or '-')}")
    return 0


def cmd_logs(args) -> int:
    jobs = client(args.address)
    job_info(jobs, args.job_id)  # an unknown id: one line, before any stream
    if not args.follow:
        print(redact(jobs.get_job_logs(args.job_id)), end="", flush=True)
        return 0
    import asyncio

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(args.job_id):
            print(redact(chunk), end="", flush=True)

    asyncio.run(tail())
    status = _status(job_info(jobs, args.job_id))
    print(f"job {args.job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_stop(args) -> int:
    jobs = client(args.address)
    status = _status(job_info(jobs, args.job_id))
    if status in TERMINAL:
        print(f"job {args.job_id}: already {status}; nothing to stop")
        return 0
    jobs.stop_job(args.job_id)
    deadline = time.monotonic() + args.wait
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = _status(job_info(jobs, args.job_id))
    print(f"job {args.job_id}: {status}" + ("" if status in TERMINAL else f" (still stopping after {args.wait:g} s)"))
    return 0 if status in TERMINAL else 1
