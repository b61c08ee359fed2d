"""The typed job spec: one tree of strict pydantic models (``extra="forbid"``), one class a
section. Loading, overrides and the checks across fields are in ``orchestrator.config.load``.
The result is plain data: ``spec.model_dump()`` goes to YAML, MLflow params and tags and Ray
Tune's param_space alike, through ``redact.redact_tree`` first wherever it leaves the process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, field_validator

from orchestrator.config.schedule import Rates, ScheduleSpec
from orchestrator.core.strict import SpecModel

MAX_SEED = 4_000_000
"""The largest ``train.seed``: rank r seeds numpy with ``seed * 1000 + r``, below 2**32."""


@dataclasses.dataclass(frozen=True)
class Batching:
    """One optimiser step at one world size: ``micro x steps x world == global``."""

    world: int
    per_worker: int
    """A worker's share of the global batch (what its data stream yields a step)."""
    micro: int
    """Images through the model at once."""
    steps: int
    """Micro-batches a step (gradient accumulation); DDP all-reduces on the last one only."""


def batching(global_batch: int, world: int, micro_batch: int | None = None) -> Batching:
    """The fewest micro-batches of at most ``micro_batch`` images that split a worker's share
    exactly (a share of 9 with a bound of 4: 3 of 3, not 4 + 4 + 1)."""
    share = global_batch // world
    steps = -(-share // micro_batch) if micro_batch else 1
    while share % steps:
        steps += 1
    return Batching(world, share, share // steps, steps)


def world_sizes(global_batch: int, low: int, high: int) -> tuple[list[int], list[int]]:
    """The world sizes in [low, high] that split ``global_batch`` exactly, and those that do not."""
    sizes = range(low, high + 1)
    return [w for w in sizes if global_batch % w == 0], [w for w in sizes if global_batch % w]


class ModelSpec(SpecModel):
    preset: str = "debug"
    """A name from flowpp.presets: debug, cifar10, imagenet32, imagenet64, imagenet64_5bit."""
    num_components: int | None = Field(None, ge=1, le=256)
    """Override the preset's logistic mixture components K."""
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    checkpoint: Literal["none", "attention", "all"] = "none"
    """Activation checkpointing: none, the attention blocks, or every coupling block."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 runs the coupling nets under autocast; the mixture maths stays float32."""
    compile: bool = False
    """torch.compile every coupling (net and mixture maths) and the context net, one graph per shape class."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """reduce-overhead replays CUDA graphs (GPU only; shapes are static); max-autotune also tunes kernels."""
    channels_last: bool = False
    """Convolution weights and activations in channels-last memory format (GPU tensor cores)."""
    image_size: int | None = Field(None, ge=4)
    """Override the preset's image size (the data must match)."""
    stages: list[str] | None = None
    """Override the preset's main-flow stages, e.g. [s2d, "stripe:2", s2d, "channel:2", "stripe:2"]."""
    hidden: int | None = Field(None, ge=1)
    """Override the width F of the main flow's coupling nets (the dequantizer keeps the preset's)."""
    num_blocks: int | None = Field(None, ge=1)
    """Override the blocks B of the main flow's coupling nets."""

    def flow_config(self):
        """The flowpp.FlowConfig this spec describes."""
        from flowpp import get_preset  # lazy: torch

        changes: dict[str, Any] = {
            "checkpoint": self.checkpoint,
            "bf16": self.precision == "bf16",
            "compile": self.compile,
            "compile_mode": self.compile_mode,
            "channels_last": self.channels_last,
        }
        for k in ("num_components", "dropout", "image_size"):
            if getattr(self, k) is not None:
                changes[k] = getattr(self, k)
        if self.stages is not None:
            changes["stages"] = tuple(self.stages)
        config = get_preset(self.preset, **changes)
        net = {k: getattr(self, k) for k in ("hidden", "num_blocks") if getattr(self, k) is not None}
        return config.replace(net=dataclasses.replace(config.net, **net)) if net else config


class DataSpec(SpecModel):
    train: str
    """URL of the training split's manifest.json (s3://, file://, a path, any fsspec URL)."""
    valid: str
    num_workers: int = Field(1, ge=0)
    """DataLoader workers per rank."""
    shuffle_buffer: int = Field(1000, ge=1)
    verify: bool = False
    """Check every shard's sha256 against the manifest as it is read."""
    allow_external_shards: bool = False
    """Let the manifests' shard URLs lie outside their folders, on s3:// or file:// only (a manifest
    cannot allow that itself)."""
    prepare: Literal["demo"] | None = None
    """Write this dataset to ``train``/``valid`` first if their manifests are missing."""
    prepare_count: int = Field(4096, ge=16)
    prepare_valid_count: int = Field(512, ge=16)
    prepare_flip: bool = False
    """``flowpp prepare demo --flip``: mirror half of the training patches left to right."""
    prepare_grey: bool = False
    """``flowpp prepare demo --grey``: train on the grey photographs too."""


class EvalTaskSpec(SpecModel):
    """Evaluation as Ray Train validation tasks: each evaluation step reports a checkpoint and the
    workers train on while a task of its own scores it (``orchestrator.training.validation``)."""

    cpus: float = Field(1.0, gt=0)
    """CPUs of each validation task (its torch threads too)."""
    gpus: float = Field(0.0, ge=0)
    """GPUs of each validation task (a fraction shares a card with others)."""
    timeout_s: float = Field(3600.0, gt=0, allow_inf_nan=False)
    """A periodic evaluation cancelled past this: one line, no figure for that step, training goes on."""
    final_timeout_s: float = Field(7200.0, gt=0, allow_inf_nan=False)
    """The last step's task (with the importance-weighted bound over the whole split) cancelled past
    this: the run ends without registering a version (its checkpoints are kept)."""


class TrainSpec(SpecModel):
    global_batch_size: int = Field(72, ge=1)
    """Images per optimiser step across all workers (the official recipe: 72), the same at every
    world size: micro-batch x accumulation steps x workers (``JobSpec.batching``)."""
    micro_batch_size: int | None = Field(None, ge=1)
    """The most images a worker puts through the model at once (its memory bound). A worker's share
    of the global batch above it is taken in several micro-batches whose gradients add up before
    the one optimiser step. None: the whole share at once."""
    lr: float = Field(4e-4, gt=0)
    """The peak rate of train.schedule constant and cosine; piecewise ignores it (phases carry the rates)."""
    warmup_steps: int = Field(10_000, ge=0)
    """Linear warm-up from 0 to lr (constant, cosine); piecewise refuses it (warm up in its phases)."""
    max_steps: int = Field(300_000, ge=1)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    """The learning-rate schedule (orchestrator.config.schedule): constant (the default), cosine or piecewise."""
    grad_clip: float = Field(1.0, gt=0)
    fused_adam: bool = False
    """Adam's fused implementation: one kernel for every parameter instead of a few per tensor."""
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """0 to 4,000,000: rank r seeds numpy with ``seed * 1000 + r``, which must stay below 2**32."""
    log_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    eval_every: int = Field(5000, ge=1)
    eval_batches: int = Field(0, ge=0)
    """Validation batches per rank at each evaluation (0: the whole split)."""
    eval_samples: int = Field(1, ge=1)
    """Dequantization samples per image at evaluation (>1: importance-weighted bound)."""
    eval_task: EvalTaskSpec | None = None
    """Evaluations (periodic and final) as validation tasks off the training workers, with resources
    of their own; the driver registers the model once the final figure is in. None: the workers
    evaluate in the loop, holding the step."""
    final_eval_samples: int = Field(16, ge=0)
    """At the end of the run, the EMA weights' importance-weighted bound over the whole validation
    split with this many dequantization samples an image, logged as ``val_bpd_iw`` (0 or 1: none)."""
    init_batch_size: int = Field(72, ge=1)
    """Training images of the data-dependent init (the official recipe: 72), read by rank 0 and
    broadcast; all of them if the split is smaller."""
    sample_grid: int = Field(16, ge=0)
    """Images in the sample grid PNG at each evaluation (0: none)."""
    max_nonfinite_steps: int = Field(20, ge=1)
    """Consecutive non-finite losses that stop the run (each one is skipped and counted)."""
    async_uploads: bool = True
    """Checkpoints upload in the background (Ray Train's asynchronous upload mode): a rank stages its
    part on local disk and trains on while it is copied to storage. A preemption notice's checkpoint
    still waits for its upload (its node may be gone at the deadline). False: every checkpoint
    step waits for its upload."""
    max_uploads_in_flight: int = Field(2, ge=1)
    """Asynchronous uploads: at most this many checkpoints staged and not yet in storage on a worker;
    a checkpoint due while that many are still uploading waits for the oldest (local disk holds at
    most this many). Ray Train keeps the last complete checkpoint until a newer one is uploaded."""
    trace_dir: str | None = None
    """A local directory where every rank appends, per step, the sample keys it trained on (an audit
    trail of the data plan across restarts) and, at the end, a hash of its parameters."""

    def rates(self) -> Rates:
        """What the learning-rate schedule reads: the schedule and three numbers."""
        return Rates(self.schedule, self.lr, self.warmup_steps, self.max_steps)


class PreemptionSpec(SpecModel):
    """Spot or preemptible nodes: Ray drains a node before its cloud reclaims it (reason
    preemption, with a deadline). The workers hear of it, checkpoint at once and train on; when the
    node goes, Ray Train restarts the group from that checkpoint, counting it as a preemption."""

    check_every_steps: int = Field(10, ge=1)
    """How often the workers ask Ray whether one of their nodes is being drained. The question is
    a barrier over the workers: 4.5 ms on 2 CPU workers (bench/preemption_check.py), 1.2% of a
    CPU test step but a few percent of a fast GPU step, so every 10 steps by default; a notice gives
    30 s to 2 minutes, and 10 steps take seconds."""
    poll_interval_s: float = Field(2.0, gt=0, le=60, allow_inf_nan=False)
    """How often Ray Train's watcher asks Ray's control store for drains of this run's nodes (Ray's
    default is 5 s). A notice reaches the workers this late at most, then their next check: of a
    30 s notice, 5 s was a sixth gone before the checkpoint began."""
    max_restarts: int = Field(-1, ge=-1)
    """Restarts after a preemption, counted apart from ``scaling.max_failures`` (-1: no limit)."""
    grace_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    """How long the other workers may go on past the drain's deadline (to finish uploading the
    just-in-time checkpoint); 0: the group restarts at the deadline."""
    relax_collectives: bool = False
    """Let the workers that stay commit the just-in-time checkpoint without those of the drained
    node (for an upload longer than the drain window; no effect when rank 0's node is drained)."""


class ScalingSpec(SpecModel):
    num_workers: int | list[int] = 1
    """Training workers: a number, or ``[min, max]`` for an elastic run. Ray Train then starts as many
    as the cluster has room for (up to max), goes on with fewer (down to min) when nodes are lost,
    and grows back when they return, each time from the latest checkpoint; the global batch stays
    ``train.global_batch_size`` at every size (accumulation makes up the difference)."""
    resize_check_s: float = Field(60.0, gt=0)
    """Elastic runs: how often Ray Train looks for room to grow the worker group while it is healthy."""
    start_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)
    """How long a worker group may take to start before Ray Train tries again. Ray sizes an elastic
    restart from what it last saw free, so just after a node is lost it may ask for the old size
    first and wait this long before it starts smaller (measured: the whole wait, every time)."""
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0)
    """GPUs per worker with ``use_gpu``: 1, a whole number, or a fraction under 1, so that several workers
    share one GPU (0.5: two a GPU). Workers that share a GPU talk over gloo (NCCL refuses two ranks on one
    device); gloo moves CUDA tensors through the host. For testing the multi-rank path on one GPU."""
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts from the last checkpoint before the run fails (-1: unlimited);
    preemptions are counted apart (``scaling.preemption.max_restarts``)."""
    preemption: PreemptionSpec = Field(default_factory=PreemptionSpec)
    peak_tflops: float | None = Field(None, gt=0)
    """One worker device's dense bf16 peak, TFLOP/s: the MFU denominator of the log line. Default: by
    the GPU's name (H100, H200, A100; orchestrator/training/mfu.py), else FLOWPP_PEAK_TFLOPS; no MFU on a CPU."""

    @field_validator("num_workers")
    @classmethod
    def _range(cls, value: int | list[int]) -> int | list[int]:
        low, high = (value, value) if isinstance(value, int) else (value + [0, 0])[:2]
        if low < 1 or high < low or (isinstance(value, list) and len(value) != 2):
            raise ValueError(f"{value}: give a number of workers >= 1, or [min, max] with 1 <= min <= max")
        return value

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


class LockSpec(SpecModel):
    """The job's lock (``<storage.path>/.flowpp/<name>/lock.json``): one driver per job."""

    heartbeat_s: float = Field(10.0, gt=0)
    """How often the driver renews it."""
    stale_s: float = Field(45.0, gt=0)
    """A lock not renewed for this long is taken over by the next driver; its old holder, if it
    comes back, finds the lock changed and stops."""
    without_conditions: Literal["refuse", "settle"] = "refuse"
    """A store that ignores conditional writes (S3's If-None-Match and If-Match; found by a probe
    at the start) cannot keep two drivers apart: ``refuse`` to run (``--no-lock`` runs without
    the lock), or ``settle``: write, wait, read back, as before conditional writes, with a warning."""


class StorageSpec(SpecModel):
    path: str = "file://./runs"
    """Ray's storage_path for checkpoints: local, file:// or s3://."""
    endpoint_url: str | None = None
    """S3-compatible endpoint; credentials come from the AWS environment, never from here."""
    region: str | None = None
    retry_mode: Literal["standard", "adaptive"] = "standard"
    """botocore's retry mode for each S3 request (both back off exponentially with jitter)."""
    retry_budget_s: float = Field(60.0, gt=0)
    """How long a read or write keeps being retried on transient errors (5xx, throttling, resets)."""
    lock: LockSpec = Field(default_factory=LockSpec)

    def options(self):
        """The ``storage.StorageOptions`` every reader and writer of this job uses."""
        from orchestrator.core.storage import StorageOptions  # lazy: fsspec, only when a job reads or writes

        return StorageOptions(
            endpoint_url=self.endpoint_url,
            region=self.region,
            retry_mode=self.retry_mode,
            retry_budget_s=self.retry_budget_s,
        )


class MlflowSpec(SpecModel):
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "flowpp"
    registered_model: str = Field("flowpp", pattern=r"^[^/:]*[^/:\s][^/:]*$")
    """The MLflow registry's name rules, checked before training: not empty, no ``/`` or ``:``."""
    enabled: bool = True
    register_model: bool = True
    """Log the final EMA model and register a new version (Tune trials leave that to the search)."""
    retry_budget_s: float = Field(300.0, gt=0)
    """How long registering the model keeps retrying while the server is away; after that the job
    fails, keeping its final checkpoint, and re-submitting it registers without training again."""
    system_metrics: bool = True
    """MLflow's system metrics (CPU, memory, disk, network, GPUs) of rank 0's machine, in the run."""
    system_metrics_interval_s: float = Field(10.0, ge=0.1)
    """Seconds between two system-metrics samples."""


class RaySpec(SpecModel):
    address: str | None = None
    """Dashboard address for ``flowpp submit`` (http://127.0.0.1:8265), or None to run here."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray's runtime_env for ``flowpp submit``. Its ``env_vars`` reach the job's processes through Ray
    only: never the workers' ``train_loop_config``, and every value is masked in MLflow and logs."""
    entrypoint_num_cpus: float = Field(0.0, ge=0)
    entrypoint_num_gpus: float = Field(0.0, ge=0)


class Distribution(SpecModel):
    """One hyperparameter's values: exactly one of the keys."""

    grid: list[Any] | None = None
    """Every value, each in its own trial (times ``num_samples``)."""
    choice: list[Any] | None = None
    """One value drawn per trial."""
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    """Integers in [low, high)."""

    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)


class AshaSpec(SpecModel):
    time_attr: str = "step"
    """The reported counter ASHA measures time in. Trained steps survive a restore of the search;
    ``training_iteration`` restarts from 0 when a trial's driver is restarted, so it is refused."""
    max_t: int = Field(..., ge=1)
    """The most ``time_attr`` a trial can reach (normally ``train.max_steps``)."""
    grace_period: int = Field(..., ge=1)
    """No trial is stopped before this much ``time_attr``."""
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, ge=1)


class TuneSpec(SpecModel):
    metric: str = "val_bpd"
    """The metric ASHA and the final ranking use; lower is better (bits/dim)."""
    space: dict[str, Distribution]
    """Dotted job-spec fields (``model.num_components``, ``train.lr``) and their values."""
    num_samples: int = Field(1, ge=1)
    """Trials per point of the grid (Ray Tune's ``num_samples``)."""
    scheduler: AshaSpec
    workers_per_trial: int = Field(1, ge=1)
    """Ray Train workers in each trial (each trial is a distributed run)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    driver_cpus: float = Field(0.05, gt=0, le=1)
    """CPU reserved by each trial's driver function. Fractional: a whole CPU per driver on a small
    node leaves nothing for the workers, and the search deadlocks."""
    max_concurrent_trials: int = Field(2, ge=1)
    register_best: bool = True
    """Register the best trial's EMA model as a new version of ``mlflow.registered_model``."""


class JobSpec(SpecModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The run's name. Deterministic: re-submitting the same job resumes it."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    tune: TuneSpec | None = None
    """A Ray Tune search over this job (``flowpp tune``; see orchestrator.driver.search)."""
    env_allow: list[str] = Field(default_factory=list)
    """Environment variables the YAML may read as ``${NAME}`` besides ``FLOWPP_*`` and
    ``MLFLOW_TRACKING_URI`` (e.g. ``[RAY_DASHBOARD]``). Read before expansion; a reference to
    any other variable is an error naming it. A credential listed here is masked wherever the
    spec is logged (its key or its ``env_vars`` entry)."""

    @property
    def per_worker_batch(self) -> int:
        """A worker's share of the global batch at the largest world size."""
        return self.batching(self.scaling.max_workers).per_worker

    def batching(self, world: int) -> Batching:
        """How ``world`` workers make up the global batch (validation refuses a world size that cannot)."""
        return batching(self.train.global_batch_size, world, self.train.micro_batch_size)
