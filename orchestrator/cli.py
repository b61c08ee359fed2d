"""The ``flowpp`` console script (also ``python -m orchestrator``).

Each subcommand is a ``_cmd_*`` function and a ``_add_*`` function that declares its
arguments. ``main`` sets up logging once, runs the command, and turns any
``FlowppError`` into one line on stderr and its exit code (2: a user mistake,
1: a runtime failure); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback

from orchestrator.errors import FlowppError, UserError
from orchestrator.logs import LEVELS, setup_logging


# -- commands -----------------------------------------------------------------------------
def _cmd_presets(args) -> int:
    import torch

    from flowpp import FlowPlusPlus, get_preset
    from flowpp.presets import OFFICIAL_PARAM_COUNTS, PRESETS

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


def _cmd_smoke(args) -> int:
    import torch

    from flowpp import build_model, get_preset
    from flowpp.distributed import data_dependent_init
    from orchestrator.step import train_step

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
    from orchestrator.storage import StorageOptions

    return StorageOptions(endpoint_url=args.s3_endpoint, region=args.s3_region)


def _cmd_prepare(args) -> int:
    from orchestrator import storage
    from orchestrator.data.prepare import PrepareOptions, prepare

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
            upload_workers=args.upload_workers,
        )
        m = prepare(opts, storage_options)
        size_mib = m["total_bytes"] / 2**20
        where = storage.join(opts.output, "manifest.json")
        print(
            f"{split}: {m['num_samples']} samples, {m['num_shards']} shards, {size_mib:.1f} MiB, "
            f"{m['skipped']['count']} skipped, {m['_kept_shards']} kept -> {where}"
        )
    return 0


def _load(args):
    """The job spec, validated before any Ray resource is used (JobSpecError: exit code 2)."""
    from orchestrator.config import load_job

    return load_job(args.job, args.set or [])


def _cmd_train(args) -> int:
    spec = _load(args)
    from orchestrator.launch import run_training

    result = run_training(spec, new_run=args.new_run)
    if result is None:
        print(f"{spec.name}: already finished (train.max_steps {spec.train.max_steps}); nothing to do. "
              "Pass --new-run for a fresh run, or raise train.max_steps to continue it.")  # fmt: skip
        return 0
    print(f"done: {spec.name}: {result.metrics}")
    return 0


def _cmd_tune(args) -> int:
    spec = _load(args)
    if spec.tune is None:
        raise UserError(f"{args.job}: no `tune:` section; see jobs/tune-mixtures.yaml")
    from orchestrator.tune import run_search

    rows = run_search(spec, resume=args.resume)
    return 0 if any(r.status != "error" for r in rows) else 1


def _tracking_uri(args) -> str:
    import os

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError("no MLflow tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return uri


def _cmd_promote(args) -> int:
    from orchestrator.promote import AlreadyChampionError, EvalSettings, promote, rollback

    uri = _tracking_uri(args)
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


def _cmd_sample(args) -> int:
    from pathlib import Path

    import torch

    from orchestrator.images import sample_grid
    from orchestrator.tracking import load_flow

    device = _device(args)
    torch.manual_seed(args.seed)
    model = load_flow(args.model, args.tracking_uri, device)
    path = sample_grid(model, args.n, Path(args.out), seed=args.seed, temperature=args.temperature)
    print(f"wrote {args.n} samples from {args.model} to {path}")
    return 0


def _cmd_evaluate(args) -> int:
    from orchestrator.evaluate import per_image_bpd
    from orchestrator.tracking import load_flow

    device = _device(args)
    model = load_flow(args.model, args.tracking_uri, device)
    common = dict(seed=args.seed, max_images=args.max_images, batch_size=args.batch_size)
    elbo = per_image_bpd(model, args.data, _storage_options(args), samples=1, **common)
    print(f"{args.model}: {elbo.mean:.4f} bits/dim (dequantization bound) on {len(elbo.bpd)} images ({device})")
    if args.iw_samples > 1:
        iw = per_image_bpd(model, args.data, _storage_options(args), samples=args.iw_samples, **common)
        print(f"{args.model}: {iw.mean:.4f} bits/dim (importance-weighted bound, {args.iw_samples} samples)")
    return 0


def _cmd_submit(args) -> int:
    spec = _load(args)
    from orchestrator.submit import submit

    return submit(spec, args.job, args.set or [], follow=not args.no_wait, new_run=args.new_run)


# -- arguments ----------------------------------------------------------------------------
def _add_storage_args(p) -> None:
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--s3-region", default=None)


def _add_device_arg(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def _add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/3 or runs:/ID/model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    _add_device_arg(p)


def _add_job_args(p, example: str) -> None:
    p.add_argument("job", help="a job YAML, e.g. jobs/imagenet64.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"override a field, e.g. {example}")


def _add_new_run_arg(p) -> None:
    p.add_argument(
        "--new-run",
        action="store_true",
        help="start a fresh run of the job (a new Ray Train run, the old one kept) instead of resuming its "
        "current run; without it a finished job does nothing",
    )


def _add_smoke(sub) -> None:
    p = sub.add_parser("smoke", help="train a preset on a fixed synthetic batch in this process")
    p.add_argument("--preset", default="debug")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_smoke)


def _add_train_tune_submit(sub) -> None:
    p = sub.add_parser("train", help="run a job spec with Ray Train (inside `ray job submit`, or embedded)")
    _add_job_args(p, "train.lr=3e-4")
    _add_new_run_arg(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", help="run the Ray Tune search in a job spec's `tune:` section, one TorchTrainer a trial")
    _add_job_args(p, "tune.num_samples=2")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search from its trials' checkpoints")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("submit", help="submit a job spec to the Ray cluster in its `ray:` section, stream logs")
    _add_job_args(p, "train.lr=3e-4")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    _add_new_run_arg(p)
    p.set_defaults(func=_cmd_submit)


def _add_promote(sub) -> None:
    p = sub.add_parser("promote", help="move @champion to a registered version if it beats the champion")
    p.add_argument("--model", required=True, metavar="NAME", help="registered model name")
    p.add_argument("--version", default=None, help="candidate version (default: the latest)")
    p.add_argument("--data", default=None, help="held-out manifest URL (default: the candidate run's data.valid)")
    p.add_argument("--margin", type=float, default=None, help="fixed margin in bits/dim (default: z x s.e.)")
    p.add_argument("--z", type=float, default=2.0, help="standard errors of the paired difference to beat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="dequantization samples per image (>1: IW bound)")
    p.add_argument("--max-images", type=int, default=0, help="score only the first N images (0: all)")
    p.add_argument("--dry-run", action="store_true", help="print the decision only")
    p.add_argument("--rollback", action="store_true", help="move @champion back to @previous")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    _add_device_arg(p)
    _add_storage_args(p)
    p.set_defaults(func=_cmd_promote)


def _add_sample_evaluate(sub) -> None:
    p = sub.add_parser("sample", help="a PNG grid of samples from a registered model")
    _add_model_args(p)
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--temperature", type=float, default=1.0)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("evaluate", help="bits/dim of a registered model on a manifest's shards")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="manifest URL of the split to score")
    p.add_argument(
        "--iw-samples",
        type=int,
        default=16,
        help="also the importance-weighted bound with this many samples an image, as a run's final "
        "evaluation (train.final_eval_samples) gives it (default: 16; 1: the one-sample bound only)",
    )
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    _add_storage_args(p)
    p.set_defaults(func=_cmd_evaluate)


def _number(parse, *, minimum: float, what: str):
    """An argparse type: ``parse`` of the text, at least ``minimum`` (argparse names the flag)."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value

    return convert


_POSITIVE_INT = _number(int, minimum=1, what="a positive integer")
_COUNT = _number(int, minimum=0, what="an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number")
    return value


def _output_url(text: str) -> str:
    """A local path or an fsspec URL with something after the scheme (``s3://`` alone has no bucket)."""
    scheme, sep, rest = text.partition("://")
    if not text.strip() or (sep and not rest.strip("/")):
        raise argparse.ArgumentTypeError(f"{text!r} names no bucket or folder")
    return text


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="write WebDataset shards and a manifest from an image source")
    p.add_argument(
        "source",
        choices=["vdo", "npz", "folder", "demo"],
        help="vdo: van den Oord's train_64x64.tar/valid_64x64.tar (or folders); npz: Chrabaszcz "
        "et al.'s batches; folder: any images, box-downsampled; demo: scikit-image photo patches",
    )
    p.add_argument("--input", help="file or folder holding the source (not needed for demo)")
    p.add_argument(
        "--output", required=True, type=_output_url, help="fsspec URL; shards go under OUTPUT/{train,valid}/"
    )
    p.add_argument("--split", default="both", choices=["train", "valid", "both"])
    p.add_argument("--format", default="png", choices=["png", "raw"])
    p.add_argument("--image-size", type=_POSITIVE_INT, default=64)
    p.add_argument("--shard-mb", type=_positive_float, default=64.0, help="target shard size in MiB")
    p.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="an unreadable input image: stop naming the file, or skip it and count it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=_COUNT, default=0, help="demo: train images (default 4096)")
    p.add_argument("--valid-count", type=_COUNT, default=0, help="demo: validation images (default 512)")
    p.add_argument("--upload-workers", type=_POSITIVE_INT, default=4)
    _add_storage_args(p)
    p.set_defaults(func=_cmd_prepare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowpp",
        description="Train, search, evaluate and promote Flow++ models on Ray, S3 and MLflow.",
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LEVELS, help="default: INFO")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("presets", help="list the model presets with their parameter counts")
    p.set_defaults(func=_cmd_presets)
    for add in (_add_smoke, _add_train_tune_submit, _add_promote, _add_sample_evaluate, _add_prepare):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except FlowppError as exc:
        if args.debug:
            from orchestrator.redact import redact

            print(redact(traceback.format_exc()), end="", file=sys.stderr)
        lines = str(exc).splitlines() or [type(exc).__name__]
        print(f"flowpp {args.command}: {lines[0]}", *lines[1:], sep="\n", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
