"""The per-worker training loop that Ray Train runs on every rank.

Reads top to bottom: the state a rank carries (``TrainState``), one optimiser step
(``train_step``), evaluation, building the state fresh or from a checkpoint, the loop, and
the end of a run. Every rank calls ``ray.train.report`` at the same steps (it is a
barrier); only rank 0 writes the shared part of a checkpoint (``orchestrator.checkpoint``)
or talks to MLflow (``orchestrator.tracking``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flowpp import FlowPlusPlus, build_model
from flowpp.distributed import data_dependent_init
from flowpp.ema import EMA
from orchestrator import checkpoint
from orchestrator.config import JobSpec, TrainSpec, public_params, public_tree
from orchestrator.data.stream import ShardStream
from orchestrator.errors import FlowppError
from orchestrator.images import sample_grid
from orchestrator.logs import setup_logging
from orchestrator.trace import Trace
from orchestrator.tracking import RunLogger

log = logging.getLogger(__name__)


class NonFiniteLossError(FlowppError):
    """Too many consecutive non-finite losses: the run stops, keeping its last good checkpoint."""


@dataclass
class TrainState:
    """Everything a rank carries from step to step; ``checkpoint`` saves and restores it."""

    model: FlowPlusPlus
    """The bare model: EMA, evaluation, sampling and checkpoints use it."""
    ddp_model: nn.Module
    """The same parameters behind DDP (the model itself on one worker): the train step uses it."""
    ema: EMA
    opt: torch.optim.Optimizer
    train_stream: ShardStream
    """Its ``state_dict()`` is this rank's position in the data plan."""
    step: int = 0
    stats: dict = field(default_factory=lambda: {"nonfinite_skipped": 0})
    """Counters that survive a restart (skipped steps), and the last validation bits/dim."""


@dataclass
class Worker:
    """What a rank knows of the run around it; passed beside the TrainState."""

    spec: JobSpec
    rank: int
    world: int
    device: torch.device
    valid: ShardStream
    tracker: RunLogger
    """A no-op on ranks > 0."""
    trace: Trace


# -- one step -----------------------------------------------------------------------------
def world_rank_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float]) -> list[float]:
    """Sum ``values`` over every rank (a no-op on one)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world_rank_size()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def lr_at(step: int, train: TrainSpec) -> float:
    """Linear warm-up to ``train.lr``, then constant (the official recipe's first phase)."""
    warm = train.warmup_steps
    return train.lr * min(1.0, (step + 1) / warm) if warm else train.lr


@dataclass
class StepResult:
    loss: float
    """Training bits/dim of the batch (NaN when the loss was not finite)."""
    grad_norm: float
    skipped: bool


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, *, lr: float, grad_clip: float):
    """One optimiser step on integer pixels ``x`` (B, C, H, W), minimising bits/dim.

    A non-finite loss or gradient on any rank skips the step on every rank (the loss
    check is all-reduced; gradients already are), leaving the weights untouched.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)  # before the forward: the last step's gradients never meet its activations
    loss = -model(x).mean() / (x[0].numel() * math.log(2))
    if all_sum([float(torch.isfinite(loss))])[0] != world_rank_size()[1]:
        return StepResult(float("nan"), float("nan"), True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)
        return StepResult(loss.item(), float("nan"), True)
    opt.step()
    return StepResult(loss.item(), grad_norm.item(), False)


@torch.no_grad()
def evaluate(model: FlowPlusPlus, valid: ShardStream, train: TrainSpec) -> float:
    """Validation bits/dim over every rank's share, with whatever weights ``model`` holds.

    The same dequantization noise at every evaluation (seeded), the caller's RNG untouched.
    """
    was_training = model.training
    model.eval()
    valid.load_state_dict({**valid.state_dict(), "consumed": 0})
    rng = torch.get_rng_state()
    torch.manual_seed(train.seed + 12345)
    total, count = 0.0, 0.0
    for i, batch in enumerate(valid):
        x = batch["images"].long()
        k = train.eval_samples
        lp = model.importance_weighted_log_prob(x, k) if k > 1 else model.log_prob(x)
        total += float(-lp.sum())
        count += x.shape[0]
        if train.eval_batches and i + 1 >= train.eval_batches:
            break
    torch.set_rng_state(rng)
    model.train(was_training)
    total, count = all_sum([total, count])
    return total / (count * model.num_dims * math.log(2))


# -- building the state -------------------------------------------------------------------
def make_streams(spec: JobSpec, rank: int, world: int) -> tuple[ShardStream, ShardStream]:
    common = dict(rank=rank, world_size=world, seed=spec.train.seed, options=spec.storage.options())
    common["verify"] = spec.data.verify
    train = ShardStream(
        spec.data.train,
        batch_size=spec.per_worker_batch,
        num_workers=spec.data.num_workers,
        shuffle_buffer=spec.data.shuffle_buffer,
        **common,
    )
    valid = ShardStream(spec.data.valid, batch_size=spec.per_worker_batch, num_workers=0, shuffle_buffer=1, **common)
    return train, valid


def _init_from_data(spec: JobSpec, model: FlowPlusPlus, train: ShardStream) -> None:
    """Data-dependent init (ActNorm, convs) on one batch, identical on every rank."""
    stream = ShardStream(
        spec.data.train,
        batch_size=spec.per_worker_batch,
        seed=10**6,
        options=spec.storage.options(),
        manifest=train.manifest,
    )
    data_dependent_init(model, next(iter(stream))["images"].long())


def build_state(spec: JobSpec, rank: int, world: int) -> tuple[TrainState, ShardStream]:
    """A fresh state after data-dependent init, or the state of Ray Train's last checkpoint."""
    import ray.train
    import ray.train.torch

    model = build_model(spec.model.flow_config())
    train, valid = make_streams(spec, rank, world)
    state = TrainState(model, model, EMA(model, spec.train.ema_decay), _adam(model, spec), train)
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            checkpoint.load(Path(d), state, rank)
        log.info("rank %d resumed from step %d (%s)", rank, state.step, restored.path)
    else:
        _init_from_data(spec, model, train)
        state.ema, state.opt = EMA(model, spec.train.ema_decay), _adam(model, spec)
    state.ddp_model = ray.train.torch.prepare_model(model, move_to_device=True)
    return state, valid


def _adam(model: nn.Module, spec: JobSpec) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=spec.train.lr)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# -- the loop -----------------------------------------------------------------------------
def train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``; ``config``: ``job`` (the spec), ``mlflow_run_id``, ``log_level``."""
    import ray.train

    setup_logging(config.get("log_level", "INFO"))
    spec = JobSpec.model_validate(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(spec.train.seed * 1000 + rank)
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))

    state, valid = build_state(spec, rank, world)
    tracking_uri = spec.mlflow.tracking_uri if rank == 0 and spec.mlflow.enabled else None
    tracker = RunLogger(tracking_uri, config.get("mlflow_run_id"))
    device = next(state.model.parameters()).device
    w = Worker(spec, rank, world, device, valid, tracker, Trace(spec.train.trace_dir, rank))
    if tracker.enabled and state.step == 0:
        _log_run_inputs(w, state)
    run(w, state)
    w.trace.final(state.step, state.model)
    if rank == 0:
        finish(w, state)


def _log_run_inputs(w: Worker, state: TrainState) -> None:
    """The spec as params (secrets removed), the manifest's hash, the resolved YAML."""
    import yaml

    manifest = state.train_stream.manifest
    params = public_params(w.spec)
    params["data.manifest_sha256"] = hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()
    params["data.dataset"] = manifest.get("source", {}).get("dataset", "?")
    w.tracker.params(params)
    w.tracker.text(yaml.safe_dump(public_tree(w.spec.model_dump()), sort_keys=False), "job.yaml")


def run(w: Worker, state: TrainState) -> None:
    """Train to ``train.max_steps``, logging, evaluating and checkpointing on schedule."""
    train = w.spec.train
    meter = Meter(state.step, w.world)
    while state.step < train.max_steps:
        for batch in state.train_stream:
            x = batch["images"].to(w.device).long()
            out = train_step(state.ddp_model, state.opt, x, lr=lr_at(state.step, train), grad_clip=train.grad_clip)
            w.trace.write(step=state.step, keys=batch["keys"], skipped=out.skipped)
            _account(w, state, out, meter, x.shape[0])
            state.step += 1
            _on_schedule(w, state, meter)
            if state.step >= train.max_steps:
                break


def _account(w: Worker, state: TrainState, out: StepResult, meter: Meter, batch: int) -> None:
    """Count a skipped step (too many in a row stop the run), or fold a good one into EMA and the meter."""
    meter.images += batch * w.world
    if not out.skipped:
        meter.consecutive_skips = 0
        state.ema.update(state.model)
        meter.add(out)
        return
    meter.consecutive_skips += 1
    state.stats["nonfinite_skipped"] = state.stats.get("nonfinite_skipped", 0) + 1
    log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", state.step, meter.consecutive_skips)
    limit = w.spec.train.max_nonfinite_steps
    if meter.consecutive_skips >= limit:
        raise NonFiniteLossError(
            f"{meter.consecutive_skips} consecutive non-finite losses at step {state.step} "
            f"(train.max_nonfinite_steps={limit}); stopping. The last good checkpoint is kept; lower "
            "train.lr or check the data, then re-submit to resume from it."
        )


def _on_schedule(w: Worker, state: TrainState, meter: Meter) -> None:
    """After a step: the log line, the EMA evaluation and the checkpoint that fall on it; then report."""
    train, step = w.spec.train, state.step
    last = step == train.max_steps
    metrics: dict = {}
    if step % train.log_every == 0 or last:
        metrics = meter.flush(step, lr_at(step - 1, train), state.stats)
        if w.rank == 0:
            log.info(meter.line(step, train.max_steps, metrics))
    if step % train.eval_every == 0 or last:
        metrics["val_bpd"] = state.stats["val_bpd"] = evaluate_ema(w, state)
    with_checkpoint = step % train.checkpoint_every == 0 or last
    if metrics or with_checkpoint:
        report(w, state, metrics, with_checkpoint)


def evaluate_ema(w: Worker, state: TrainState) -> float:
    """Validation bits/dim of the EMA weights; rank 0 also logs a sample grid from them."""
    model = state.model
    with state.ema.average_parameters(model):
        val_bpd = evaluate(model, w.valid, w.spec.train)
        if w.rank == 0 and w.spec.train.sample_grid:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"samples-{state.step:08d}.png"
                sample_grid(model.eval(), w.spec.train.sample_grid, path, seed=w.spec.train.seed)
                w.tracker.artifact(path, "samples")
            model.train()
    if w.rank == 0:
        log.info("step %d: validation bits/dim (EMA) %.4f", state.step, val_bpd)
    return val_bpd


def report(w: Worker, state: TrainState, metrics: dict, with_checkpoint: bool) -> None:
    """MLflow (rank 0), then ``ray.train.report`` on every rank, with this step's checkpoint if due."""
    import ray.train

    w.tracker.metrics(metrics, state.step)
    metrics = {**metrics, "step": state.step}
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with checkpoint.staged(state, w.rank) as directory:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


class Meter:
    """Running sums between two log lines (loss, grad norm, images), the rate and the ETA."""

    def __init__(self, step: int, world: int):
        self.started, self.first_step = time.perf_counter(), step
        self.consecutive_skips = 0
        self._reset(self.started)

    def _reset(self, now: float) -> None:
        self.loss, self.grad_norm, self.count, self.images, self.since = 0.0, 0.0, 0, 0, now

    def add(self, out: StepResult) -> None:
        self.loss += out.loss
        self.grad_norm += out.grad_norm
        self.count += 1

    def flush(self, step: int, lr: float, stats: dict) -> dict:
        now, n = time.perf_counter(), max(1, self.count)
        metrics = {
            "train_bpd": self.loss / n,
            "grad_norm": self.grad_norm / n,
            "images_per_s": self.images / max(1e-9, now - self.since),
            "lr": lr,
            "nonfinite_skipped": stats.get("nonfinite_skipped", 0),
        }
        self._reset(now)
        return metrics

    def line(self, step: int, max_steps: int, metrics: dict) -> str:
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
        eta = (max_steps - step) / rate if rate > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        return (
            f"step {step}/{max_steps}  bits/dim {metrics['train_bpd']:.4f}  images/s {metrics['images_per_s']:.1f}"
            f"  lr {metrics['lr']:.2e}  grad_norm {metrics['grad_norm']:.3f}  eta {eta_s}"
        )


# -- the end of a run ---------------------------------------------------------------------
def finish(w: Worker, state: TrainState) -> None:
    """Rank 0: register the EMA model as a new version (once), and close the MLflow run."""
    spec, tracker = w.spec, w.tracker
    if not tracker.enabled:
        return
    if not spec.mlflow.register_model:  # a Tune trial: the search registers its best
        tracker.finish()
        return
    if tracker.registered_version():
        return  # a re-submitted, already finished job: nothing new to register
    val = state.stats.get("val_bpd")
    tags = {"val_bpd": f"{val:.6f}" if val is not None else "nan", "job": spec.name}
    with state.ema.average_parameters(state.model):
        version = tracker.register_model(state.model, spec.mlflow.registered_model, tags)
    tracker.finish()
    log.info("registered %s version %s (val bits/dim %s)", spec.mlflow.registered_model, version, val)
