"""Every subcommand's arguments: one ``add_*`` function each, every argument with help that
shows its default (``DefaultsFormatter``)."""

from __future__ import annotations

import argparse

from orchestrator.cli import commands, jobs
from orchestrator.core.progress import MODES


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after an argument's help, except where the help already says
    its default, or there is none to show (None, a flag's False; a 0 is shown)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


def add_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that also takes the global flags after its name (``flowpp evaluate ... --progress off``)."""
    return sub.add_parser(name, help=help, description=help, formatter_class=DefaultsFormatter, parents=_AFTER)


# -- shared groups of arguments -----------------------------------------------------------
def _storage_args(p) -> None:
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--s3-region", default=None, help="S3 region (default: AWS_REGION, else the endpoint's)")


def _device_arg(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def _tracking_arg(p) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")


def _model_args(p, required: bool = True, also: str = "") -> None:
    p.add_argument("--model", required=required, help=f"models:/NAME@champion, models:/NAME/3 or runs:/ID/model{also}")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the dequantization noise or the samples")
    _tracking_arg(p)
    _device_arg(p)


def _job_args(p, example: str) -> None:
    p.add_argument("job", help="a job YAML, e.g. jobs/imagenet64.yaml")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help=f"override a field of the spec, repeatable, e.g. {example} (default: none)",
    )


def _dry_run_arg(p) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved spec (secrets masked) and what would run, then exit; starts nothing",
    )


def _new_run_arg(p) -> None:
    p.add_argument(
        "--new-run",
        action="store_true",
        help="start a fresh run of the job (a new Ray Train run, the old one kept) instead of resuming its "
        "current run; without it a finished job does nothing",
    )


def _address_arg(p) -> None:
    p.add_argument(
        "--address",
        default=None,
        help=f"the Ray dashboard (job server) address (default: RAY_ADDRESS, else {jobs.DEFAULT_ADDRESS}); "
        "token auth through RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH",
    )


# -- the subcommands ----------------------------------------------------------------------
def add_presets_smoke(sub) -> None:
    p = add_parser(sub, "presets", "list the model presets with their parameter counts")
    p.set_defaults(func=commands.cmd_presets)
    p = add_parser(sub, "smoke", "train a preset on a fixed synthetic batch in this process")
    p.add_argument("--preset", default="debug", help="model preset (see `flowpp presets`)")
    p.add_argument("--steps", type=_POSITIVE_INT, default=100, help="training steps")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the weights and the batch")
    p.set_defaults(func=commands.cmd_smoke)


def add_validate(sub) -> None:
    p = add_parser(sub, "validate", "print a job spec as it would run (after ${VAR} and --set, secrets masked)")
    _job_args(p, "train.lr=3e-4")
    p.set_defaults(func=jobs.cmd_validate)


def add_train_tune_submit(sub) -> None:
    p = add_parser(sub, "train", "run a job spec with Ray Train (inside `ray job submit`, or embedded)")
    _job_args(p, "train.lr=3e-4")
    _new_run_arg(p)
    p.add_argument(
        "--no-lock",
        action="store_true",
        help="run without the job's lock (for a store that ignores conditional writes); nothing then keeps a "
        "second driver of the same job out",
    )
    _dry_run_arg(p)
    p.set_defaults(func=commands.cmd_train)

    p = add_parser(sub, "tune", "run the Ray Tune search in a job spec's `tune:` section, one TorchTrainer a trial")
    _job_args(p, "tune.num_samples=2")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search from its trials' checkpoints")
    _dry_run_arg(p)
    p.set_defaults(func=commands.cmd_tune)

    p = add_parser(sub, "submit", "submit a job spec to the Ray cluster in its `ray:` section, stream logs")
    _job_args(p, "train.lr=3e-4")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return (then: flowpp logs ID)")
    _new_run_arg(p)
    _dry_run_arg(p)
    p.set_defaults(func=commands.cmd_submit)


def add_logs_status_stop(sub) -> None:
    p = add_parser(sub, "logs", "print a submitted job's logs (Ray's JobSubmissionClient)")
    p.add_argument("job_id", help="the submission id (raysubmit_...) that submit printed")
    p.add_argument(
        "--follow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="follow the logs until the job ends (exit 0 if it succeeded, else 1); --no-follow: print them and return",
    )
    _address_arg(p)
    p.set_defaults(func=jobs.cmd_logs)

    p = add_parser(sub, "status", "a submitted job's status, entrypoint, start and end times and message")
    p.add_argument("job_id", help="the submission id (raysubmit_...) that submit printed")
    _address_arg(p)
    p.set_defaults(func=jobs.cmd_status)

    p = add_parser(sub, "stop", "stop a submitted job and report its status")
    p.add_argument("job_id", help="the submission id (raysubmit_...) that submit printed")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the job to stop")
    _address_arg(p)
    p.set_defaults(func=jobs.cmd_stop)


def add_promote(sub) -> None:
    p = add_parser(sub, "promote", "move @champion to a registered version if it beats the champion")
    p.add_argument("--model", required=True, metavar="NAME", help="registered model name")
    p.add_argument("--version", default=None, help="candidate version (default: the latest)")
    p.add_argument("--data", default=None, help="held-out manifest URL (default: the set the champion won on, else its "
                   "run's data.valid; the candidate's only when there is no champion)")  # fmt: skip
    p.add_argument("--margin", type=float, default=None, help="fixed margin in bits/dim (default: z x s.e.)")
    p.add_argument("--z", type=float, default=2.0, help="standard errors of the paired difference to beat")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the dequantization noise (the same for both)")
    p.add_argument("--samples", type=_POSITIVE_INT, default=1, help="dequantization samples per image (>1: IW bound)")
    p.add_argument("--max-images", type=_COUNT, default=0, help="score only the first N images (0: all)")
    p.add_argument("--dry-run", action="store_true", help="print the decision only")
    p.add_argument("--rollback", action="store_true", help="move @champion back to @previous")
    p.add_argument("--break-lock", action="store_true",
                   help="first delete the promotion lock whoever holds it (recorded on the model)")  # fmt: skip
    _tracking_arg(p)
    _device_arg(p)
    _storage_args(p)
    p.set_defaults(func=commands.cmd_promote)


def add_sample_evaluate(sub) -> None:
    p = add_parser(sub, "sample", "a PNG grid of samples from a registered model")
    _model_args(p)
    p.add_argument("-n", type=_POSITIVE_INT, default=64, help="number of samples")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the latent noise")
    p.set_defaults(func=commands.cmd_sample)

    p = add_parser(sub, "evaluate", "bits/dim of a registered model (or lossless codecs) on a manifest's shards")
    _model_args(p, required=False, also="; optional with --baseline, which then scores only the codecs")
    p.add_argument("--data", required=True, help="manifest URL of the split to score")
    p.add_argument(
        "--iw-samples",
        type=_POSITIVE_INT,
        default=16,
        help="also the importance-weighted bound with this many samples an image, as a run's final "
        "evaluation (train.final_eval_samples) gives it (default: 16; 1: the one-sample bound only)",
    )
    p.add_argument("--max-images", type=_COUNT, default=0, help="score only the first N images (0: all)")
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=32, help="images scored at a time")
    p.add_argument(
        "--baseline",
        metavar="CODECS",
        default=None,
        help="also print these lossless codecs' bits/dim on the same images, after the model's, e.g. png,webp "
        "(png: optimize; webp: lossless, method 6; the files' sizes alone) and the model's lead over each "
        "(default: none)",
    )
    _storage_args(p)
    p.set_defaults(func=commands.cmd_evaluate)


def _number(parse, *, minimum: float, what: str, maximum: float = float("inf")):
    """An argparse type: ``parse`` of the text, from ``minimum`` to ``maximum`` (argparse names the flag)."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value

    return convert


_POSITIVE_INT = _number(int, minimum=1, what="a positive integer")
_COUNT = _number(int, minimum=0, what="an integer >= 0")
_SEED = _number(int, minimum=0, maximum=2**31 - 1, what="a seed from 0 to 2147483647")


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


def add_prepare(sub) -> None:
    p = add_parser(sub, "prepare", "write WebDataset shards and a manifest from an image source")
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
    p.add_argument("--split", default="both", choices=["train", "valid", "both"], help="which split(s) to write")
    p.add_argument(
        "--whole",
        action="store_true",
        help="take an input that names no split (a plain folder of images) whole as the one --split asked for; "
        "without it such an input is split by a hash of each name, 5%% to valid and the rest to train",
    )
    p.add_argument("--format", default="png", choices=["png", "raw"], help="how each image is stored in a shard")
    p.add_argument("--image-size", type=_POSITIVE_INT, default=64, help="side of the square images, in pixels")
    p.add_argument("--shard-mb", type=_positive_float, default=64.0, help="target shard size in MiB")
    p.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="an unreadable input image: stop naming the file, or skip it and count it",
    )
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the shuffle (and of the demo's patches)")
    p.add_argument("--count", type=_COUNT, default=0, help="demo: train images (0: 4096)")
    p.add_argument("--valid-count", type=_COUNT, default=0, help="demo: validation images (0: 512)")
    p.add_argument("--flip", action="store_true", help="demo: mirror half of the training patches left to right")
    p.add_argument("--grey", action="store_true", help="demo: train on the 11 grey photographs too (as RGB)")
    p.add_argument("--upload-workers", type=_POSITIVE_INT, default=4, help="parallel shard uploads")
    _storage_args(p)
    p.set_defaults(func=commands.cmd_prepare)


def add_global(parser, levels, version: str) -> None:
    parser.add_argument("--version", action="version", version=f"flowpp {version}", help="print the version and exit")
    _global_flags(parser, levels, argparse.SUPPRESS, defaults=True)
    _AFTER[:] = [argparse.ArgumentParser(add_help=False)]  # afresh for each parser built
    _global_flags(_AFTER[0], levels, argparse.SUPPRESS, defaults=False)


def _global_flags(parser, levels, suppress, defaults: bool) -> None:
    """--log-level, --debug and --progress: before the command (``defaults``: with their defaults),
    and after it, where an absent flag leaves the attribute alone (SUPPRESS), so a flag given before
    the command survives; one given after it wins."""

    def default(value):
        return value if defaults else suppress

    parser.add_argument(
        "--log-level", default=default("INFO"), type=str.upper, choices=levels, help="logging level (default: INFO)"
    )
    parser.add_argument("--debug", action="store_true", default=default(False), help="show the traceback of an error")
    parser.add_argument(
        "--progress",
        choices=MODES,
        default=default(None),
        help="progress bars on stderr: a live bar in a terminal and a line every 30 s in a log (auto), always a "
        "live bar (on), or none (off); TQDM_DISABLE=1 also turns them off (default: FLOWPP_PROGRESS, else auto)",
    )


# the global flags as each subcommand takes them: a parent parser that add_global makes before the
# subcommands are added
_AFTER: list[argparse.ArgumentParser] = []

SUBCOMMANDS = (
    add_presets_smoke,
    add_validate,
    add_train_tune_submit,
    add_logs_status_stop,
    add_promote,
    add_sample_evaluate,
    add_prepare,
)
