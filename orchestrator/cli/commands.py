"""The subcommands that train, search, prepare, evaluate and promote: one ``cmd_*`` each,
taking the parsed arguments and returning the exit code (arguments: ``cli.arguments``)."""

from __future__ import annotations

import math
import time

from orchestrator.cli.jobs import dry_run
from orchestrator.core.errors import UserError


# -- commands -----------------------------------------------------------------------------
def cmd_presets(args) -> int:
    import torch

    from flowpp import FlowPlusPlus, get_preset  # lazy: torch
    from flowpp.presets import OFFICIAL_PARAM_COUNTS, PRESETS  # lazy: torch

    print(f"{'preset':<18}{'image':>10}{'params':>14}{'official':>14}")
    for name in PRESETS:
        cfg = get_preset(name)
        with torch.device("meta"):
            n = sum(p.numel() for p in FlowPlusPlus(cfg).parameters())
        official = OFFICIAL_PARAM_COUNTS.get(name)
        shape = f"{cfg.image_size}x{cfg.image_size}/{cfg.num_bits}b"
        print(f"{name:<18}{shape:>10}{n:>14,}{(f'{official:,}' if official else '-'):>14}")
    return 0


def smooth_images(n: int, size: int, num_levels: int = 256, seed: int = 0):
    """Structured synthetic images: 4x4 random colours upsampled bilinearly."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=True)
    return (img * (num_levels - 1)).round().to(torch.int64)


def cmd_smoke(args) -> int:
    import torch

    from flowpp import build_model, get_preset  # lazy: torch
    from flowpp.distributed import data_dependent_init  # lazy: torch
    from orchestrator.training.step import train_step  # lazy: flowpp --help loads only what it shows

    torch.manual_seed(args.seed)
    model = build_model(get_preset(args.preset))
    x = smooth_images(16, model.config.image_size)
    data_dependent_init(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    loss = math.nan
    for step in range(1, args.steps + 1):
        loss = train_step(model, opt, x, lr=args.lr, grad_clip=1.0).loss
        if step == 1 or step % 20 == 0 or step == args.steps:
            rate = 16 * step / (time.perf_counter() - start)
            print(f"step {step:>4}  bits/dim {loss:.3f}  images/s {rate:.1f}", flush=True)
    samples = model.eval().sample(4)
    ok = math.isfinite(loss) and samples.dtype == torch.uint8
    print(f"sampled {tuple(samples.shape)} uint8 images; final bits/dim {loss:.3f}")
    return 0 if ok else 1


def _device(args) -> str:
    """``--device``, checked before any model is downloaded."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _storage_options(args):
    from orchestrator.core.storage import StorageOptions  # lazy: flowpp --help loads only what it shows

    return StorageOptions(endpoint_url=args.s3_endpoint, region=args.s3_region)


def cmd_prepare(args) -> int:
    from orchestrator.core import storage  # lazy: flowpp --help loads only what it shows
    from orchestrator.data.prepare import PrepareOptions, prepare  # lazy: flowpp --help loads only what it shows

    if args.whole and args.split == "both":
        raise UserError("--whole takes the whole input as one split: give --split train or --split valid")
    splits = ["train", "valid"] if args.split == "both" else [args.split]
    storage_options = _storage_options(args)
    for split in splits:
        opts = PrepareOptions(
            source=args.source,
            input=args.input or "",
            output=storage.join(args.output, split),
            split=split,
            format=args.format,
            image_size=args.image_size,
            shard_bytes=int(args.shard_mb * 2**20),
            on_error=args.on_error,
            seed=args.seed,
            count=args.count if split == "train" else args.valid_count,
            flip=args.flip,
            grey=args.grey,
            upload_workers=args.upload_workers,
            whole=args.whole,
        )
        m = prepare(opts, storage_options)
        size_mib = m["total_bytes"] / 2**20
        where = storage.join(opts.output, "manifest.json")
        print(
            f"{split}: {m['num_samples']} samples, {m['num_shards']} shards, {size_mib:.1f} MiB, "
            f"{m['skipped']['count']} skipped, {m['_kept_shards']} kept -> {where}"
        )
        if taken := m["source"].get("holdout_taken"):
            print(f"  {taken[0]} of {taken[1]} images: an input that names no split is split by a hash of each name "
                  f"({m['source']['holdout']:.0%} to valid, the rest to train); --whole takes all of it as the "
                  "--split asked for")  # fmt: skip
    return 0


def _load(args):
    """The job spec, validated before any Ray resource is used (JobSpecError: exit code 2)."""
    from orchestrator.config import load_job  # lazy: flowpp --help loads only what it shows

    return load_job(args.job, args.set or [])


def cmd_train(args) -> int:
    spec = _load(args)
    if args.dry_run:
        return dry_run(spec, "train", args)
    from orchestrator.driver.launch import run_training  # lazy: flowpp --help loads only what it shows

    result = run_training(spec, new_run=args.new_run, lock=not args.no_lock)
    if result is None:
        print(f"{spec.name}: already finished (train.max_steps {spec.train.max_steps}); nothing to do. "
              "Pass --new-run for a fresh run, or raise train.max_steps to continue it.")  # fmt: skip
        return 0
    print(f"done: {spec.name}: {result.metrics}")
    return 0


def cmd_tune(args) -> int:
    spec = _load(args)
    if spec.tune is None:
        raise UserError(f"{args.job}: no `tune:` section; see jobs/tune-mixtures.yaml")
    if args.dry_run:
        return dry_run(spec, "tune", args)
    from orchestrator.driver.search import run_search  # lazy: flowpp --help loads only what it shows

    rows = run_search(spec, resume=args.resume)
    return 0 if any(r.status != "error" for r in rows) else 1


def _tracking_uri(args) -> str:
    import os

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError("no MLflow tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return uri


def cmd_promote(args) -> int:
    # lazy: flowpp --help loads only what it shows
    from orchestrator.driver.promote import AlreadyChampionError, EvalSettings, break_lock, promote, rollback

    uri = _tracking_uri(args)
    if args.break_lock:
        break_lock(uri, args.model)
    if args.rollback:
        rollback(uri, args.model)
        return 0
    settings = EvalSettings(
        data=args.data,
        seed=args.seed,
        samples=args.samples,
        max_images=args.max_images,
        options=_storage_options(args),
        device=_device(args),
    )
    try:
        decision = promote(uri, args.model, args.version, settings, args.margin, args.z, args.dry_run)
    except AlreadyChampionError as exc:  # what was asked already holds: idempotent, as `make demo` twice needs
        print(f"{exc}; nothing to do")
        return 0
    return 0 if decision.promote or args.dry_run else 3


def cmd_sample(args) -> int:
    from pathlib import Path

    import torch

    from orchestrator.evaluation.images import sample_grid  # lazy: flowpp --help loads only what it shows
    from orchestrator.tracking import load_flow  # lazy: flowpp --help loads only what it shows

    device = _device(args)
    torch.manual_seed(args.seed)
    model = load_flow(args.model, args.tracking_uri, device)
    path = sample_grid(model, args.n, Path(args.out), args.seed, args.temperature, desc=f"sampling {args.model}")
    print(f"wrote {args.n} samples from {args.model} to {path}")
    return 0


def cmd_evaluate(args) -> int:
    # lazy: flowpp --help loads only what it shows
    from orchestrator.evaluation.baselines import parse_codecs, score_codecs

    if not args.model and not args.baseline:
        raise UserError("the following arguments are required: --model (or --baseline CODECS to score only codecs)")
    codecs = parse_codecs(args.baseline) if args.baseline else []  # a bad name fails before a model loads
    bound = None
    if args.model:
        bound = _evaluate_model(args)
    if codecs:
        kw = dict(seed=args.seed, max_images=args.max_images, desc=f"baselines ({', '.join(codecs)})")
        baselines = score_codecs(args.data, codecs, _storage_options(args), **kw)
        for baseline in baselines:
            print(baseline.line())
        if bound is not None:
            name, bpd = bound
            for baseline in baselines:
                print(f"{args.model} ({name}) vs {baseline.codec}: {bpd - baseline.bpd:+.4f} bits/dim")
    return 0


def _evaluate_model(args) -> tuple[str, float]:
    """Print the model's bounds; return the tighter one's name and bits/dim."""
    from orchestrator.evaluation.evaluate import per_image_bpd  # lazy: flowpp --help loads only what it shows
    from orchestrator.tracking import load_flow  # lazy: flowpp --help loads only what it shows

    device = _device(args)
    model = load_flow(args.model, args.tracking_uri, device)
    common = dict(seed=args.seed, max_images=args.max_images, batch_size=args.batch_size)
    elbo = per_image_bpd(model, args.data, _storage_options(args), samples=1, desc=args.model, **common)
    print(f"{args.model}: {elbo.mean:.4f} bits/dim (dequantization bound) on {len(elbo.bpd)} images ({device})")
    if args.iw_samples > 1:
        desc = f"{args.model} ({args.iw_samples} samples)"
        iw = per_image_bpd(model, args.data, _storage_options(args), samples=args.iw_samples, desc=desc, **common)
        print(f"{args.model}: {iw.mean:.4f} bits/dim (importance-weighted bound, {args.iw_samples} samples)")
        return "importance-weighted", iw.mean
    return "dequantization bound", elbo.mean


def cmd_submit(args) -> int:
    spec = _load(args)
    if args.dry_run:
        return dry_run(spec, "submit", args)
    from orchestrator.driver.submit import submit  # lazy: flowpp --help loads only what it shows

    return submit(spec, args.job, args.set or [], follow=not args.no_wait, new_run=args.new_run)
