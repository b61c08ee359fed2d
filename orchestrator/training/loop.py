"""The per-worker training loop that Ray Train runs on every rank.

Reads top to bottom: the state a rank carries (``TrainState``), one optimiser step
(``train_step``), evaluation, building the state fresh or from a checkpoint, the loop, and
the end of a run. Every rank calls ``ray.train.report`` at the same steps (it is a
barrier); only rank 0 writes the shared part of a checkpoint (``orchestrator.training.checkpoint``)
or talks to MLflow (``orchestrator.tracking``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowpp import FlowPlusPlus, build_model
from flowpp.distributed import data_dependent_init
from flowpp.ema import EMA
from flowpp.flops import train_flops_per_image
from orchestrator.config import JobSpec, TrainSpec, headline_params, redact_tree, spec_tags
from orchestrator.config.schedule import learning_rate
from orchestrator.config.spec import Batching
from orchestrator.core.errors import FlowppError
from orchestrator.core.logs import setup_logging
from orchestrator.core.progress import govern_libraries
from orchestrator.data.stream import ShardStream, to_device
from orchestrator.data.stream import for_job as stream_for_job
from orchestrator.evaluation.evaluate import evaluate, periodic_batches
from orchestrator.evaluation.images import sample_grid
from orchestrator.tracking import RunLogger
from orchestrator.training import checkpoint
from orchestrator.training.meter import Meter
from orchestrator.training.mfu import device_peak_flops
from orchestrator.training.state import TrainState
from orchestrator.training.step import StepResult, ddp_options, step_noise, train_step
from orchestrator.training.trace import Trace
from orchestrator.training.tracker import Tracker
from orchestrator.training.validation import REQUESTED
from orchestrator.training.validation import task_config as validation_task

log = logging.getLogger(__name__)


class NonFiniteLossError(FlowppError):
    """Too many consecutive non-finite losses: the run stops, keeping its last good checkpoint."""


@dataclass
class Worker:
    """What a rank knows of the run around it; passed beside the TrainState."""

    spec: JobSpec
    rank: int
    world: int
    device: torch.device
    valid: ShardStream
    tracker: Tracker
    """A no-op on ranks > 0."""
    trace: Trace
    staging: checkpoint.Staging | None = None
    """Where checkpoints wait for their asynchronous upload (``train.async_uploads``); None: synchronous."""

    @property
    def batching(self) -> Batching:
        """How this world size makes up the global batch (micro-batches, accumulation steps)."""
        return self.spec.batching(self.world)


# -- one step -----------------------------------------------------------------------------
def lr_at(step: int, train: TrainSpec) -> float:
    """The learning rate of (0-based) ``step`` under ``train.schedule``."""
    return learning_rate(step, train.rates())


def whole_split_batches(w: Worker) -> Iterator[torch.Tensor]:
    """Every validation image, split across ranks one image at a time (a plan of batch 1
    leaves fewer than ``world`` images out), re-batched to the micro-batch."""
    spec = w.spec
    stream = stream_for_job(spec, "valid", rank=w.rank, world=w.world, batch_size=1, manifest=w.valid.manifest)
    images: list[torch.Tensor] = []
    for batch in stream:
        images.append(batch["images"])
        if len(images) == w.batching.micro:
            yield torch.cat(images)
            images = []
    if images:
        yield torch.cat(images)


# -- building the state -------------------------------------------------------------------
def make_streams(spec: JobSpec, rank: int, world: int, pin_memory: bool = False) -> tuple[ShardStream, ShardStream]:
    """This rank's train and validation streams (pinned batches when it trains on a GPU)."""
    train = stream_for_job(spec, "train", rank=rank, world=world, pin_memory=pin_memory)
    valid = stream_for_job(spec, "valid", rank=rank, world=world, pin_memory=pin_memory)
    return train, valid


def init_images(spec: JobSpec, manifest: dict) -> torch.Tensor:
    """``train.init_batch_size`` training images (fewer if the split is smaller), the same
    whatever the world size: a fixed seed, one image at a time from a shuffled plan."""
    stream = stream_for_job(
        spec, "train", batch_size=1, seed=10**6, shuffle_buffer=256, num_workers=0, manifest=manifest
    )
    images = [batch["images"] for batch in itertools.islice(stream, spec.train.init_batch_size)]
    return torch.cat(images)


def _init_from_data(spec: JobSpec, model: FlowPlusPlus, train: ShardStream, rank: int) -> None:
    """Data-dependent init (ActNorm, convs): rank 0 runs it on ``init_images`` on the
    model's device, then broadcasts every parameter and buffer from there."""
    batch = None
    if rank == 0:
        device = next(model.parameters()).device
        batch = to_device(init_images(spec, train.manifest), device, model.config.num_bits)
        log.info("data-dependent init on %d images (%s)", batch.shape[0], device)
    data_dependent_init(model, batch)


def build_state(spec: JobSpec, rank: int, world: int) -> tuple[TrainState, ShardStream]:
    """A fresh state after data-dependent init, or the state of Ray Train's last checkpoint.

    Everything is made on the worker's device (``ray.train.torch.get_device``) before the
    EMA copy, the optimizer and DDP see the parameters.
    """
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_model(spec.model.flow_config()).to(device)
    train, valid = make_streams(spec, rank, world, pin_memory=device.type == "cuda")
    restored = ray.train.get_checkpoint()
    if not restored:
        _init_from_data(spec, model, train, rank)
    state = TrainState(model, model, EMA(model, spec.train.ema_decay), _adam(model, spec), train)
    if restored:
        with restored.as_directory() as d:
            checkpoint.load(Path(d), state, rank)
        log.info("rank %d resumed from step %d (%s)", rank, state.step, restored.path)
    state.ddp_model = ray.train.torch.prepare_model(model, move_to_device=True, parallel_strategy_kwargs=ddp_options())
    return state, valid


def _adam(model: nn.Module, spec: JobSpec) -> torch.optim.Optimizer:
    """One fused kernel (``train.fused_adam``), else foreach ops: never the loop over parameters
    that Adam picks on a CPU unless asked."""
    if spec.train.fused_adam:
        return torch.optim.Adam(model.parameters(), lr=spec.train.lr, fused=True)
    return torch.optim.Adam(model.parameters(), lr=spec.train.lr, foreach=True)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# -- the loop -----------------------------------------------------------------------------
def train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``; ``config``: ``job`` (the spec), ``mlflow_run_id``, ``log_level``."""
    import ray.train

    setup_logging(config.get("log_level", "INFO"))
    govern_libraries()  # a worker logs to a file: MLflow's upload bars off
    spec = JobSpec.model_validate(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(spec.train.seed * 1000 + rank)
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))

    state, valid = build_state(spec, rank, world)
    tracking_uri = spec.mlflow.tracking_uri if rank == 0 and spec.mlflow.enabled else None
    tracker: Tracker = RunLogger(tracking_uri, config.get("mlflow_run_id"), retry_budget_s=spec.mlflow.retry_budget_s)
    tracker.system_metrics(spec.mlflow)  # rank 0's machine: CPU, memory, GPUs; stopped by finish
    device = next(state.model.parameters()).device
    staging = None
    if spec.train.async_uploads:  # the same folder at every attempt of this rank: a restart clears it
        staging = checkpoint.Staging.for_rank(spec.train.max_uploads_in_flight, spec.name, spec.storage.path, rank)
    w = Worker(spec, rank, world, device, valid, tracker, Trace(spec.train.trace_dir, rank), staging)
    if tracker.enabled and state.step == 0:
        _log_run_inputs(w, state)
        log_samples(w, state.model, 0)  # the slider opens at step 0: the untrained model's samples
    try:
        run(w, state)
    finally:
        if staging is not None and staging.in_flight():
            # Ray Train finishes the uploads queued before it ends the worker; a failed one left its folder
            log.info("rank %d: %d checkpoint upload(s) still in flight at the end of the loop", rank,
                     len(staging.in_flight()))  # fmt: skip
    w.trace.final(state.step, state.model)
    if rank == 0:
        finish(w, state)


def _log_run_inputs(w: Worker, state: TrainState) -> None:
    """A few headline params, the whole spec as ``spec.*`` tags (secrets removed), the manifest's
    hash and dataset as tags, the resolved YAML as ``job.yaml``."""
    import yaml

    manifest = state.train_stream.manifest
    tags = spec_tags(w.spec)
    tags["data.manifest_sha256"] = hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()
    tags["data.dataset"] = manifest.get("source", {}).get("dataset", "?")
    w.tracker.params(headline_params(w.spec))
    w.tracker.tags(tags)
    w.tracker.text(yaml.safe_dump(redact_tree(w.spec.model_dump()), sort_keys=False), "job.yaml")


def run(w: Worker, state: TrainState) -> None:
    """Train to ``train.max_steps``, logging, evaluating and checkpointing on schedule."""
    train = w.spec.train
    meter = Meter(state.step, w.world, w.device, usage_of(w, state.model), accum=w.batching.steps)
    noise = torch.Generator(device=w.device)  # the dequantization noise's, seeded afresh each step
    while state.step < train.max_steps:
        batches = iter(state.train_stream)
        while state.step < train.max_steps:
            waited = time.perf_counter()  # the time the step waits for its batch: the loader's share of the step
            batch = next(batches, None)
            if batch is None:
                break  # the epoch is over: the stream goes on with the next one
            x = to_device(batch["images"], w.device, state.model.config.num_bits)
            meter.data_wait += time.perf_counter() - waited
            eps = step_noise(state.model, x, seed=train.seed, step=state.step, rank=w.rank, world=w.world,
                             generator=noise)  # fmt: skip
            out = train_step(state.ddp_model, state.opt, x, lr=lr_at(state.step, train), grad_clip=train.grad_clip,
                             micro=w.batching.micro if w.batching.steps > 1 else 0, noise=eps)  # fmt: skip
            w.trace.write(step=state.step, keys=batch["keys"], skipped=out.skipped, world=w.world)
            _account(w, state, out, meter, x.shape[0])
            state.step += 1
            _on_schedule(w, state, meter)


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
        metrics = meter.flush(lr_at(step - 1, train), state.stats, substituted(state.train_stream))
        if w.rank == 0:
            log.info(meter.line(step, train.max_steps, metrics))
    evaluating, final = step % train.eval_every == 0 or last, last and train.final_eval_samples > 1
    validation = None
    if evaluating and train.eval_task is not None:  # a validation task scores this step's checkpoint
        validation = validation_task(w.spec, step, final)
        metrics[REQUESTED] = 2 if final else 1
    elif evaluating:
        metrics["val_bpd"] = state.stats["val_bpd"] = evaluate_ema(w, state)
        if final:
            metrics["val_bpd_iw"] = state.stats["val_bpd_iw"] = final_evaluation(w, state)
    with_checkpoint = step % train.checkpoint_every == 0 or last or validation is not None
    urgent = False
    if preemption_notice(w, state):
        # just in time, and uploaded before the step goes on: the drained node may be gone at the deadline
        with_checkpoint = urgent = True
        metrics["preemption_notices"] = state.stats["preemption_notices"]
    w.tracker.metrics(metrics, step)  # MLflow (rank 0): every log step
    # Ray Train only what it acts on: a checkpoint, or a figure a search ranks trials on. Its
    # controller takes one report a rank per poll (2 s), so a report at every log step queued up
    # behind each other, and a checkpoint waited its turn behind them (one lost with its node)
    if with_checkpoint or evaluating:
        report(w, state, metrics, with_checkpoint, wait_for_upload=urgent, validation=validation)


def preemption_notice(w: Worker, state: TrainState) -> bool:
    """Every ``scaling.preemption.check_every_steps`` steps, ask Ray Train whether a node of this
    run is being drained for preemption: True at the first check that sees a given drain. Every
    rank asks at the same steps (the question is a barrier over them)."""
    import ray.train

    if state.step % w.spec.scaling.preemption.check_every_steps:
        return False
    info = ray.train.get_preemption_info()
    if info is None:
        return False
    seen = f"{','.join(info.preempted_node_ids)}@{info.deadline_ms}"
    if state.stats.get("preemption_seen") == seen:
        return False  # checkpointed for this drain already: train on until it comes
    state.stats["preemption_seen"] = seen
    state.stats["preemption_notices"] = state.stats.get("preemption_notices", 0) + 1
    if w.rank == 0:
        left = f"{(info.deadline_ms / 1000 - time.time()):.0f} s left" if info.deadline_ms else "no deadline given"
        nodes = ", ".join(n[:12] for n in info.preempted_node_ids)
        log.warning("step %d: preemption notice for node(s) %s (ranks %s; %s): checkpointing now, then training on",
                    state.step, nodes, info.preempted_ranks, left)  # fmt: skip
    return True


def evaluate_ema(w: Worker, state: TrainState) -> float:
    """Validation bits/dim of the EMA weights; rank 0 also logs a sample grid from them."""
    model, train = state.model, w.spec.train
    with state.ema.average_parameters(model):
        batches = periodic_batches(w.valid, train.eval_batches)
        val_bpd, _ = evaluate(model, batches, samples=train.eval_samples, seed=train.seed + 12345)
        if w.rank == 0:
            log_samples(w, model, state.step)
    if w.rank == 0:
        log.info("step %d: validation bits/dim (EMA) %.4f", state.step, val_bpd)
    return val_bpd


def log_samples(w: Worker, model: FlowPlusPlus, step: int) -> None:
    """Rank 0: a grid of ``train.sample_grid`` samples from ``model`` as an MLflow image at ``step``
    (the UI's image slider moves by step; a run's first grid, at step 0, is the untrained model)."""
    if not (w.spec.train.sample_grid and w.tracker.enabled):
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"samples-{step:08d}.png"
        sample_grid(model.eval(), w.spec.train.sample_grid, path, seed=w.spec.train.seed)
        w.tracker.image(path, "samples", step)
    model.train()


def final_evaluation(w: Worker, state: TrainState) -> float:
    """The importance-weighted bound of the EMA weights, ``train.final_eval_samples`` samples
    an image, over the whole validation split: the figure comparable with the paper's."""
    train = w.spec.train
    if w.rank == 0:
        log.info("step %d: final evaluation, %d samples an image, whole validation split", state.step,
                 train.final_eval_samples)  # fmt: skip
    started = time.perf_counter()
    with state.ema.average_parameters(state.model):
        share = sum(s["num_samples"] for s in w.valid.manifest["shards"]) // w.world  # this rank's images
        bpd, count = evaluate(state.model, whole_split_batches(w), samples=train.final_eval_samples,
                              seed=train.seed + 54321, desc="final evaluation", total=share)  # fmt: skip
    if w.rank == 0:
        log.info("step %d: validation bits/dim (EMA, importance-weighted, %d samples) %.4f on %d images in %.0f s",
                 state.step, train.final_eval_samples, bpd, count, time.perf_counter() - started)  # fmt: skip
    return bpd


def report(w: Worker, state: TrainState, metrics: dict, with_checkpoint: bool, wait_for_upload: bool = False,
           validation=None) -> None:  # fmt: skip
    """``ray.train.report`` on every rank, with this step's checkpoint if due (and ``validation``, a
    ``ray.train.ValidationTaskConfig``, asking for a validation task on it).

    With ``train.async_uploads`` every report goes through Ray Train's asynchronous mode, in order
    behind the uploads in flight (a synchronous report would wait for them): the step goes on at
    once, unless ``train.max_uploads_in_flight`` checkpoints are still uploading, or
    ``wait_for_upload`` (a preemption notice's checkpoint) asks for this one to be in storage first.
    """
    import ray.train

    metrics = {**metrics, "step": state.step}
    mode = ray.train.CheckpointUploadMode
    if w.staging is None:  # synchronous: each checkpoint in storage before the step goes on
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with checkpoint.staged(state, w.rank) as directory:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             validation=validation or False)  # fmt: skip
        if w.rank == 0:
            log.info("step %d: checkpoint saved (keeping the last %d)", state.step, w.spec.train.keep_checkpoints)
        return
    if not with_checkpoint:
        ray.train.report(metrics, checkpoint_upload_mode=mode.ASYNC)
        return
    part, waited = w.staging.stage(state, w.rank)
    state.stats["upload_wait_s"] = state.stats.get("upload_wait_s", 0.0) + waited
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(part)),
                     checkpoint_upload_mode=mode.SYNC if wait_for_upload else mode.ASYNC,
                     delete_local_checkpoint_after_upload=True, validation=validation or False)  # fmt: skip
    if w.rank == 0:
        how = "uploaded" if wait_for_upload else "uploading in the background"
        wait = f"; waited {waited:.1f} s for room among the uploads in flight" if waited >= 0.1 else ""
        log.info("step %d: checkpoint %s (keeping the last %d%s)", state.step, how, w.spec.train.keep_checkpoints,
                 wait)  # fmt: skip


def substituted(stream: ShardStream) -> int:
    """Samples of this rank's stream replaced by the previous image so far (corrupt, or cut off
    by a truncated shard); the count is in the stream's state, so it survives a restart."""
    return int(stream.stats.get("corrupt_samples", 0) + stream.stats.get("truncated_samples", 0))


def usage_of(w: Worker, model: FlowPlusPlus) -> tuple[float | None, float | None]:
    """(training FLOPs per image, the device's peak FLOP/s) for MFU; (None, None) where the peak is
    unknown (a CPU without ``scaling.peak_tflops``), and the FLOPs are not counted there."""
    peak = device_peak_flops(w.device, w.spec.scaling.peak_tflops)
    if peak is None:
        return None, None
    flops = train_flops_per_image(model.config, w.device)
    if w.rank == 0:
        log.info("MFU: %.3g GFLOPs a training image (forward + backward) against %.3g TFLOP/s a worker",
                 flops / 1e9, peak / 1e12)  # fmt: skip
    return flops, peak


# -- the end of a run ---------------------------------------------------------------------
def finish(w: Worker, state: TrainState) -> None:
    """Rank 0: register the EMA model as a new version (once), and close the MLflow run."""
    spec, tracker = w.spec, w.tracker
    if not tracker.enabled:
        return
    tracker.flush()  # the metrics queued while MLflow was away, before anything else
    if spec.train.eval_task is not None:  # the driver registers, once the final validation task is done
        return
    if not spec.mlflow.register_model:  # a Tune trial: the search registers its best
        tracker.finish()
        return
    if tracker.registered_version():
        return  # a re-submitted, already finished job: nothing new to register
    val, val_iw = state.stats.get("val_bpd"), state.stats.get("val_bpd_iw")
    tags = {"val_bpd": f"{val:.6f}" if val is not None else "nan", "job": spec.name}
    if val_iw is not None:
        tags.update(val_bpd_iw=f"{val_iw:.6f}", val_bpd_iw_samples=str(spec.train.final_eval_samples))
    with state.ema.average_parameters(state.model):
        version = tracker.register_model(state.model, spec.mlflow.registered_model, tags)
    tracker.finish()
    log.info("registered %s version %s (val bits/dim %s, importance-weighted %s)", spec.mlflow.registered_model,
             version, val, val_iw)  # fmt: skip
