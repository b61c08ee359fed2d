"""The per-worker training loop that Ray Train runs on every rank.

A few named functions: ``build_model``, ``make_streams``, ``train_step``,
``evaluate``, ``save_checkpoint`` / ``load_checkpoint``; ``train_loop`` ties them
together. Every rank calls ``ray.train.report`` at the same steps (it is a
barrier); only rank 0 writes a checkpoint or talks to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flowpp import FlowPlusPlus
from flowpp import build_model as build_flow
from flowpp.distributed import data_dependent_init
from flowpp.ema import EMA
from orchestrator.config import JobSpec
from orchestrator.data.stream import ShardStream
from orchestrator.registry import RunLogger
from orchestrator.storage import StorageOptions

log = logging.getLogger("flowpp.train")


class NonFiniteLossError(RuntimeError):
    pass


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if _dist()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def build_model(spec: JobSpec) -> FlowPlusPlus:
    return build_flow(spec.model.flow_config())


def storage_options(spec: JobSpec) -> StorageOptions:
    return StorageOptions(endpoint_url=spec.storage.endpoint_url, region=spec.storage.region)


def make_streams(spec: JobSpec, rank: int, world: int) -> tuple[ShardStream, ShardStream]:
    opts = storage_options(spec)
    common = dict(rank=rank, world_size=world, seed=spec.train.seed, options=opts, verify=spec.data.verify)
    train = ShardStream(
        spec.data.train,
        batch_size=spec.per_worker_batch,
        num_workers=spec.data.num_workers,
        shuffle_buffer=spec.data.shuffle_buffer,
        **common,
    )
    valid = ShardStream(spec.data.valid, batch_size=spec.per_worker_batch, num_workers=0, shuffle_buffer=1, **common)
    return train, valid


def lr_at(step: int, spec: JobSpec) -> float:
    """Linear warm-up to ``train.lr``, then constant (the official recipe's first phase)."""
    warm = spec.train.warmup_steps
    return spec.train.lr * min(1.0, (step + 1) / warm) if warm else spec.train.lr


def _bpd_loss(model, x: torch.Tensor, num_dims: int) -> torch.Tensor:
    return -model(x).mean() / (num_dims * math.log(2))


def train_step(model, opt, x, step, spec: JobSpec, num_dims: int) -> dict:
    """One optimiser step; a non-finite loss or gradient on any rank skips it on every rank."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, spec)
    loss = _bpd_loss(model, x, num_dims)
    finite = _all_sum([float(torch.isfinite(loss))])[0] == _dist()[1]
    if not finite:
        opt.zero_grad(set_to_none=True)
        return {"loss": float("nan"), "grad_norm": float("nan"), "skipped": True}
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
    if not torch.isfinite(grad_norm):  # grads are all-reduced: every rank agrees
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "grad_norm": float("nan"), "skipped": True}
    opt.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "skipped": False}


@torch.no_grad()
def evaluate(model: FlowPlusPlus, valid: ShardStream, spec: JobSpec) -> float:
    """Validation bits/dim over every rank's share (with whatever weights ``model`` holds)."""
    was_training = model.training
    model.eval()
    valid.load_state_dict({**valid.state_dict(), "consumed": 0})
    gen_state = torch.get_rng_state()
    torch.manual_seed(spec.train.seed + 12345)  # same dequantization noise at every evaluation
    total, count = 0.0, 0
    for i, batch in enumerate(valid):
        x = batch["images"].long()
        lp = (
            model.importance_weighted_log_prob(x, spec.train.eval_samples)
            if spec.train.eval_samples > 1
            else model.log_prob(x)
        )
        total += float(-lp.sum())
        count += x.shape[0]
        if spec.train.eval_batches and i + 1 >= spec.train.eval_batches:
            break
    torch.set_rng_state(gen_state)
    model.train(was_training)
    total, count = _all_sum([total, count])
    return total / (count * model.num_dims * math.log(2))


def sample_grid(model: FlowPlusPlus, n: int, path: Path, seed: int, temperature: float = 1.0) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    images = model.sample(n, temperature=temperature, generator=gen).numpy()  # (n, C, H, W)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    c, h, w = images.shape[1:]
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img.transpose(1, 2, 0)
    Image.fromarray(grid.squeeze() if c == 1 else grid).save(path)
    return path


def save_checkpoint(directory: Path, *, model, ema, opt, step, stream, stats, rank) -> None:
    """Every rank writes its own RNG state; rank 0 writes the rest."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(rng, directory / f"rng-rank{rank}.pt")
    if rank == 0:
        torch.save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
            },
            directory / "state.pt",
        )
        (directory / "meta.json").write_text(json.dumps({"step": step, "stream": stream.state_dict(), "stats": stats}))


def load_checkpoint(directory: Path, *, model, ema, opt, stream, rank) -> tuple[int, dict]:
    state = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    meta = json.loads((directory / "meta.json").read_text())
    stream.load_state_dict(meta["stream"])
    rng_file = directory / f"rng-rank{rank}.pt"
    if rng_file.exists():  # absent when the world size grew
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return state["step"], meta.get("stats", {})


def _log_line(step, max_steps, metrics, started, first_step) -> str:
    elapsed = time.perf_counter() - started
    rate = (step - first_step) / elapsed if elapsed > 0 else 0.0
    eta = (max_steps - step) / rate if rate > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    return (
        f"step {step}/{max_steps}  bits/dim {metrics['train_bpd']:.4f}  images/s {metrics['images_per_s']:.1f}"
        f"  lr {metrics['lr']:.2e}  grad_norm {metrics['grad_norm']:.3f}  eta {eta_s}"
    )


def train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config`` is the job spec dict plus ``_mlflow_run_id``."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_id = config.pop("_mlflow_run_id", None)
    spec = JobSpec.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(spec.train.seed * 1000 + rank)
    np.random.seed(spec.train.seed * 1000 + rank)
    random.seed(spec.train.seed * 1000 + rank)
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))

    model = build_model(spec)
    train_stream, valid_stream = make_streams(spec, rank, world)
    ema = EMA(model, spec.train.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=spec.train.lr)
    mlf = RunLogger(spec.mlflow.tracking_uri if rank == 0 and spec.mlflow.enabled else None, run_id)
    step, stats = 0, {"nonfinite_skipped": 0}

    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            step, stats = load_checkpoint(Path(d), model=model, ema=ema, opt=opt, stream=train_stream, rank=rank)
        log.info("rank %d resumed from step %d (%s)", rank, step, restored.path)
    else:
        init_batch = next(
            iter(
                ShardStream(
                    spec.data.train,
                    batch_size=spec.per_worker_batch,
                    seed=10**6,
                    options=storage_options(spec),
                    manifest=train_stream.manifest,
                )
            )
        )
        data_dependent_init(model, init_batch["images"].long())
        ema = EMA(model, spec.train.ema_decay)
        opt = torch.optim.Adam(model.parameters(), lr=spec.train.lr)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=True)
    device = next(model.parameters()).device
    if rank == 0 and step == 0:
        mlf.params(_params(spec, train_stream))
        import yaml

        from orchestrator.config import public_tree

        mlf.text(yaml.safe_dump(public_tree(spec.model_dump()), sort_keys=False), "job.yaml")

    _run(spec, ddp_model, model, ema, opt, train_stream, valid_stream, mlf, step, stats, rank, world, device)


def _params(spec, stream) -> dict:
    from orchestrator.config import public_params

    manifest_hash = json.dumps(stream.manifest["shards"], sort_keys=True)
    import hashlib

    params = public_params(spec)
    params["data.manifest_sha256"] = hashlib.sha256(manifest_hash.encode()).hexdigest()
    params["data.dataset"] = stream.manifest.get("source", {}).get("dataset", "?")
    return params


def _run(spec, ddp_model, model, ema, opt, train_stream, valid_stream, mlf, step, stats, rank, world, device):
    import ray.train
    from ray.train import Checkpoint

    num_dims = model.num_dims
    started, first_step = time.perf_counter(), step
    window = {"loss": 0.0, "n": 0, "t": time.perf_counter(), "images": 0, "grad_norm": 0.0}
    consecutive = 0
    while step < spec.train.max_steps:
        for batch in train_stream:
            x = batch["images"].to(device).long()
            out = train_step(ddp_model, opt, x, step, spec, num_dims)
            _trace(spec, rank, {"step": step, "keys": batch["keys"], "skipped": out["skipped"]})
            if out["skipped"]:
                consecutive += 1
                stats["nonfinite_skipped"] = stats.get("nonfinite_skipped", 0) + 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, consecutive)
                if consecutive >= spec.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{consecutive} consecutive non-finite losses at step {step} (train.max_nonfinite_steps="
                        f"{spec.train.max_nonfinite_steps}); stopping. The last good checkpoint is kept; lower "
                        "train.lr or check the data, then re-submit to resume from it."
                    )
            else:
                consecutive = 0
                ema.update(model)
                window["loss"] += out["loss"]
                window["grad_norm"] += out["grad_norm"]
                window["n"] += 1
            window["images"] += x.shape[0] * world
            step += 1
            metrics, checkpoint = {}, None
            if step % spec.train.log_every == 0 or step == spec.train.max_steps:
                metrics = _window_metrics(window, step, spec, stats)
                if rank == 0:
                    log.info(_log_line(step, spec.train.max_steps, metrics, started, first_step))
            if step % spec.train.eval_every == 0 or step == spec.train.max_steps:
                metrics.update(_evaluate_and_sample(spec, model, ema, valid_stream, mlf, step, rank))
            if step % spec.train.checkpoint_every == 0 or step == spec.train.max_steps:
                checkpoint = _checkpoint(model, ema, opt, step, train_stream, stats, rank)
            if metrics or checkpoint:
                metrics = {**metrics, "step": step}
                mlf.metrics({k: v for k, v in metrics.items() if k != "step"}, step)
                if checkpoint is not None:
                    with checkpoint as directory:
                        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
                else:
                    ray.train.report(metrics)
            if step >= spec.train.max_steps:
                break
    _trace(spec, rank, {"final_step": step, "params_sha256": _param_digest(model)})
    if rank == 0:
        _finish(spec, model, ema, valid_stream, mlf)


def _trace(spec, rank, record: dict) -> None:
    if not spec.train.trace_dir:
        return
    import ray

    record = {**record, "rank": rank, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
    path = Path(spec.train.trace_dir) / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _param_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _window_metrics(window, step, spec, stats) -> dict:
    now = time.perf_counter()
    n = max(1, window["n"])
    metrics = {
        "train_bpd": window["loss"] / n,
        "grad_norm": window["grad_norm"] / n,
        "images_per_s": window["images"] / max(1e-9, now - window["t"]),
        "lr": lr_at(step - 1, spec),
        "nonfinite_skipped": stats.get("nonfinite_skipped", 0),
    }
    window.update(loss=0.0, n=0, t=now, images=0, grad_norm=0.0)
    return metrics


def _evaluate_and_sample(spec, model, ema, valid_stream, mlf, step, rank) -> dict:
    with ema.average_parameters(model):
        val_bpd = evaluate(model, valid_stream, spec)
        if rank == 0 and spec.train.sample_grid:
            with tempfile.TemporaryDirectory() as tmp:
                grid = sample_grid(
                    model.eval(),
                    spec.train.sample_grid,
                    Path(tmp) / f"samples-{step:08d}.png",
                    seed=spec.train.seed,
                )
                mlf.artifact(grid, "samples")
            model.train()
    if rank == 0:
        log.info("step %d: validation bits/dim (EMA) %.4f", step, val_bpd)
    return {"val_bpd": val_bpd}


class _TempCheckpoint:
    def __init__(self, **kw):
        self.kw = kw

    def __enter__(self):
        self.tmp = tempfile.TemporaryDirectory()
        save_checkpoint(Path(self.tmp.name), **self.kw)
        return self.tmp.name

    def __exit__(self, *exc):
        self.tmp.cleanup()


def _checkpoint(model, ema, opt, step, stream, stats, rank):
    return _TempCheckpoint(model=model, ema=ema, opt=opt, step=step, stream=stream, stats=stats, rank=rank)


def _finish(spec, model, ema, valid_stream, mlf) -> None:
    """Rank 0: log the EMA model as an MLflow pyfunc and register a new version."""
    if not mlf.enabled:
        return
    from orchestrator import registry

    if not spec.mlflow.register_model:  # a Tune trial: the search registers its best
        mlf.finish()
        return
    if "flowpp.registered_version" in mlf.client.get_run(mlf.run_id).data.tags:
        return  # a re-submitted, already finished job: nothing new to register

    with ema.average_parameters(model):
        val = mlf.client.get_run(mlf.run_id).data.metrics.get("val_bpd")
        uri = registry.log_flow_model(spec.mlflow.tracking_uri, mlf.run_id, model)
    version = registry.register(
        spec.mlflow.tracking_uri,
        uri,
        spec.mlflow.registered_model,
        {"val_bpd": f"{val:.6f}" if val is not None else "nan", "job": spec.name, "run_id": mlf.run_id},
    )
    mlf.tag("flowpp.registered_version", version)
    mlf.finish()
    log.info("registered %s version %s (val bits/dim %s)", spec.mlflow.registered_model, version, val)
