"""A Ray Tune search over a job spec: one distributed TorchTrainer per trial, ASHA on bits/dim.

The Ray 2.60 pattern: ``Tuner(driver_fn)``, where each trial's driver function builds
its own ``TorchTrainer`` with a ``TuneReportCallback`` and runs it. The driver holds a
fractional CPU (a whole one per driver on a small node leaves nothing for the
workers, and the search deadlocks) and ``max_concurrent_trials`` bounds the rest.

Layout under ``storage.path``: ``<search>/`` is Tune's experiment (what ``--resume``
restores) and ``<search>/trials/<search>-<trial id>/`` is each trial's Ray Train run,
with its checkpoints. A restored trial re-runs its driver, whose TorchTrainer has the
same name and storage path and so resumes from the trial's own last checkpoint.

MLflow: the search is a parent run (tagged ``flowpp.job=<search>``), each trial a
child run with its params and metric curves. At the end the best trial's EMA weights,
from its last checkpoint, are registered as a new model version tagged with the
search's run id.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from orchestrator import tracking
from orchestrator.config import JobSpec, TuneSpec, apply_overrides, flatten, validate
from orchestrator.core import storage
from orchestrator.core.errors import FlowppError, UserError
from orchestrator.core.logs import setup_logging
from orchestrator.core.redact import redact, without_env_vars
from orchestrator.training import checkpoint

log = logging.getLogger(__name__)

SEARCH_TAG = "flowpp.search"
TRIAL_TAG = "flowpp.trial"


class SearchError(FlowppError):
    """The search failed as a whole (no trial left a usable checkpoint, ...)."""


class SearchSetupError(SearchError, UserError):
    """The search cannot start as asked: it exists already, there is none to resume, or a trial does not fit."""


def _tune(spec: JobSpec) -> TuneSpec:
    if spec.tune is None:
        raise SearchSetupError(f"{spec.name}: the job spec has no `tune:` section; see jobs/tune-mixtures.yaml")
    return spec.tune


def param_space(tune_spec: TuneSpec) -> dict:
    """Ray Tune distributions keyed by the dotted job-spec field they set."""
    from ray import tune

    makers = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {key: makers[d.kind()](getattr(d, d.kind())) for key, d in tune_spec.space.items()}


def trial_spec(search: JobSpec, overrides: dict, trial_id: str) -> JobSpec:
    """The job one trial runs: the search's job with the trial's values and Tune's shape.

    Every report carries val_bpd and a checkpoint (log, eval and checkpoint on the same
    steps): ASHA needs the metric at each report, and the final ranking needs the weights
    that produced the final figure.
    """
    t = _tune(search)
    tree = apply_overrides(search.model_dump(exclude={"tune"}), overrides)
    tree["name"] = f"{search.name}-{trial_id}"
    tree["scaling"].update(num_workers=t.workers_per_trial, cpus_per_worker=t.cpus_per_worker)
    every = tree["train"]["eval_every"]
    tree["train"].update(log_every=every, checkpoint_every=every)
    tree["storage"]["path"] = trials_path(search)
    tree["mlflow"]["register_model"] = False
    return validate(tree, f"trial {trial_id}")


def trials_path(search: JobSpec) -> str:
    return f"{search.storage.path.rstrip('/')}/{search.name}/trials"


def run_trial(config: dict, *, job: dict, parent_run_id: str | None, log_level: str = "INFO") -> None:
    """Tune's driver function: one distributed training run for one point of the space."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.driver.launch import make_trainer  # lazy: launch's Ray Train imports, in the trial

    setup_logging(log_level)
    trial_id = ray.tune.get_context().get_trial_id()
    spec = trial_spec(JobSpec.model_validate(job), config, trial_id)
    run_id = None
    if spec.mlflow.enabled:
        tags = {SEARCH_TAG: parent_run_id or "", TRIAL_TAG: trial_id}
        run_id = tracking.ensure_run(
            spec.mlflow.tracking_uri, spec.mlflow.experiment, spec.name, parent_run_id=parent_run_id, tags=tags
        )
        # the trial's point of the space as params (MLflow's parallel coordinates compare params);
        # rank 0 adds the headline params and the whole spec as tags
        point = tracking.RunLogger(spec.mlflow.tracking_uri, run_id)
        point.params(config)
        point.flush()
    make_trainer(spec, run_id, callbacks=[TuneReportCallback()]).fit()
    _drain_reports()


def _drain_reports(timeout_s: float = 30.0) -> None:
    """Wait until Tune has taken the trial's last report off the callback's queue.

    The callback hands reports over through a one-slot queue; a driver function that
    returns while the final report still sits there ends the trial without it, and the
    trial would look stopped one evaluation short of the end.
    """
    import time

    from ray.train._internal.session import get_session

    queue = getattr(get_session(), "_inter_actor_queue", None)
    deadline = time.monotonic() + timeout_s
    while queue is not None and not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.1)


def _fit_concurrency(t: TuneSpec) -> int:
    """Concurrent trials that fit in the cluster's CPUs; an error if not even one does."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    per_trial = t.driver_cpus + t.workers_per_trial * t.cpus_per_worker
    fits = int(math.floor(cpus / per_trial + 1e-9))
    if fits < 1:
        raise SearchSetupError(
            f"tune: one trial needs {per_trial:g} CPUs (tune.driver_cpus {t.driver_cpus:g} + "
            f"tune.workers_per_trial {t.workers_per_trial} x tune.cpus_per_worker {t.cpus_per_worker:g}) "
            f"and the cluster has {cpus:g}"
        )
    if fits < t.max_concurrent_trials:
        log.warning(
            "tune.max_concurrent_trials=%d does not fit in %g CPUs at %g per trial; running %d at a time",
            t.max_concurrent_trials,
            cpus,
            per_trial,
            fits,
        )
    return min(fits, t.max_concurrent_trials)


def make_tuner(spec: JobSpec, parent_run_id: str | None, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t = _tune(spec)
    fs, path = storage.pyarrow_filesystem(spec.storage.path, spec.storage.options())
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, job=without_env_vars(spec.model_dump()), parent_run_id=parent_run_id, log_level=level
        ),
        {"cpu": t.driver_cpus},
    )
    experiment = f"{path.rstrip('/')}/{spec.name}"
    exists = tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    where = f"{spec.storage.path.rstrip('/')}/{spec.name}"
    if resume:
        if not exists:
            raise SearchSetupError(f"--resume: no search to resume at {redact(where)}")
        log.info("resuming the search at %s", redact(where))
        return tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    if exists:
        raise SearchSetupError(
            f"a search named {spec.name!r} already exists at {redact(where)}: "
            "pass --resume to continue it, or change `name`"
        )
    sched = t.scheduler
    return tune.Tuner(
        trainable,
        param_space=param_space(t),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode="min",
            num_samples=t.num_samples,
            max_concurrent_trials=_fit_concurrency(t),
            scheduler=ASHAScheduler(
                time_attr=sched.time_attr,
                max_t=sched.max_t,
                grace_period=sched.grace_period,
                reduction_factor=sched.reduction_factor,
                brackets=sched.brackets,
            ),
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=path, storage_filesystem=fs),
    )


@dataclass
class TrialRow:
    trial_id: str
    overrides: dict
    best_val_bpd: float
    final_val_bpd: float
    steps: int
    wall_s: float
    status: str
    checkpoint_path: str | None


def summarize(results, spec: JobSpec) -> list[TrialRow]:
    """One row per trial from Tune's ResultGrid, best first."""
    rows = []
    for r in results:
        m = r.metrics or {}
        curve = r.metrics_dataframe
        vals = curve[_tune(spec).metric].dropna() if curve is not None and _tune(spec).metric in curve else []
        steps = int(m.get("step", 0) or 0)
        if r.error is not None:
            status = "error"
        elif steps >= spec.train.max_steps:
            status = "complete"
        else:
            status = "stopped early"
        rows.append(
            TrialRow(
                trial_id=str(m.get("trial_id") or os.path.basename(str(r.path)).split("_")[-1]),
                overrides={k: r.config.get(k) for k in _tune(spec).space},
                best_val_bpd=float(min(vals)) if len(vals) else math.nan,
                final_val_bpd=float(m.get(_tune(spec).metric, math.nan)),
                steps=steps,
                wall_s=float(m.get("time_total_s", 0.0) or 0.0),
                status=status,
                checkpoint_path=m.get("checkpoint_path"),
            )
        )
    return sorted(rows, key=lambda row: (math.isnan(row.final_val_bpd), row.final_val_bpd))


def format_table(rows: list[TrialRow], spec: JobSpec) -> str:
    """Markdown: every trial's mixture components and lr (the preset's or the job's where not
    searched), then a column for each other searched field (by its last name: ``hidden``), the
    best validation bits/dim, steps, wall time and status."""
    preset_k = spec.model.flow_config().num_components
    extra = [k for k in _tune(spec).space if k not in ("model.num_components", "train.lr")]

    def value(row, key, default):
        return row.overrides.get(key, default)

    names = "".join(f" {k.rsplit('.', 1)[-1]} |" for k in extra)
    lines = [
        f"| trial | components | lr |{names} best val bits/dim | steps | wall time (s) | status |",
        "|---|---:|---:|" + "---:|" * len(extra) + "---:|---:|---:|---|",
    ]
    for row in rows:
        k = value(row, "model.num_components", preset_k)
        lr = value(row, "train.lr", spec.train.lr)
        cells = [row.trial_id, k, f"{lr:.3g}", *(value(row, key, "") for key in extra)]
        cells += [f"{row.best_val_bpd:.4f}", row.steps, f"{row.wall_s:.0f}", row.status]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def best_row(rows: list[TrialRow]) -> TrialRow:
    """The trial with the lowest final validation bits/dim that left a checkpoint."""
    usable = [r for r in rows if r.status != "error" and r.checkpoint_path and math.isfinite(r.final_val_bpd)]
    if not usable:
        raise SearchError("no trial finished an evaluation with a checkpoint; nothing to register")
    return min(usable, key=lambda r: r.final_val_bpd)


def load_trial_model(spec: JobSpec, row: TrialRow):
    """The trial's model with the EMA weights of its last checkpoint, and the trial's job spec."""
    trial = trial_spec(spec, row.overrides, row.trial_id)
    url = row.checkpoint_path
    assert url is not None
    if "://" not in url and storage.protocol_of(spec.storage.path) not in ("file", "local"):
        url = f"{storage.protocol_of(spec.storage.path)}://{url}"  # pyarrow paths carry no scheme
    return checkpoint.load_ema_model(url, trial.model.flow_config(), spec.storage.options()), trial


def register_best(spec: JobSpec, row: TrialRow, parent_run_id: str | None) -> str:
    """Log the best trial's EMA model in its own child run and register it; returns the version."""
    model, trial = load_trial_model(spec, row)
    uri = spec.mlflow.tracking_uri
    child = tracking.find_run(uri, spec.mlflow.experiment, trial.name) or tracking.ensure_run(
        uri, spec.mlflow.experiment, trial.name, parent_run_id=parent_run_id
    )
    tags = {
        SEARCH_TAG: parent_run_id or "",
        TRIAL_TAG: row.trial_id,
        "val_bpd": f"{row.final_val_bpd:.6f}",
        "job": trial.name,
        **{f"hparam.{k}": v for k, v in row.overrides.items()},
    }
    return tracking.RunLogger(uri, child).register_model(model, spec.mlflow.registered_model, tags)


def run_search(spec: JobSpec, resume: bool = False) -> list[TrialRow]:
    """Run (or resume) the search to the end; print the table; register the best trial."""
    from orchestrator.driver.launch import ensure_data, init_ray, resolve_paths  # lazy: as make_trainer

    _tune(spec)
    spec = resolve_paths(spec)
    ensure_data(spec)
    parent = None
    if spec.mlflow.enabled:
        parent = tracking.ensure_run(spec.mlflow.tracking_uri, spec.mlflow.experiment, spec.name)
        tracking.RunLogger(spec.mlflow.tracking_uri, parent).params(_search_params(spec))
    # the search's run ends FAILED if the search raises, KILLED on Ctrl-C or SIGTERM
    with tracking.run_status_on_exit(spec.mlflow.tracking_uri if parent else None, parent):
        init_ray(spec)
        results = make_tuner(spec, parent, resume).fit()
        rows = summarize(results, spec)
        table = format_table(rows, spec)
        print(f"\nsearch {spec.name}: {len(rows)} trials\n{table}\n", flush=True)
        if parent:
            _close_search(spec, rows, table, parent)
    return rows


def _search_params(spec: JobSpec) -> dict:
    params = {f"tune.{k}": v for k, v in flatten(_tune(spec).model_dump()).items()}
    params.update({"model.preset": spec.model.preset, "train.max_steps": spec.train.max_steps})
    return params


def _close_search(spec: JobSpec, rows: list[TrialRow], table: str, parent: str) -> None:
    search_run = tracking.RunLogger(spec.mlflow.tracking_uri, parent)
    search_run.text(table, "trials.md")
    tracking.finish_children(spec.mlflow.tracking_uri, parent, {r.trial_id: r.status for r in rows})
    best = best_row(rows)
    search_run.metrics({"best_val_bpd": best.final_val_bpd}, step=best.steps)
    search_run.tag("flowpp.best_trial", best.trial_id)
    if _tune(spec).register_best and not search_run.registered_version():
        version = register_best(spec, best, parent)
        search_run.tag(tracking.REGISTERED_TAG, version)
        print(f"registered {spec.mlflow.registered_model} version {version}: trial {best.trial_id}, "
              f"val bits/dim {best.final_val_bpd:.4f}", flush=True)  # fmt: skip
    search_run.finish()
