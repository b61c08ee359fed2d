"""The ``flowpp`` console script (also ``python -m orchestrator``).

Each subcommand is a ``cmd_*`` function (``commands``: training, data and models; ``jobs``:
validate, --dry-run, and submitted jobs) and an ``add_*`` function that declares its arguments
(``arguments``). ``main`` sets up logging once, runs the command, and turns any ``FlowppError``
into one line on stderr and its exit code (2: a user mistake, 1: a runtime failure);
``--debug`` adds the traceback. A bare ``flowpp`` prints the help and exits 2.

May import: every package; the commands import what they run inside their bodies, so that
``flowpp --help`` loads no torch, Ray or MLflow.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from orchestrator.cli.arguments import SUBCOMMANDS, DefaultsFormatter, add_global
from orchestrator.cli.commands import smooth_images
from orchestrator.core.errors import USER_MISTAKE, FlowppError
from orchestrator.core.logs import LEVELS, setup_logging
from orchestrator.core.progress import ENV as PROGRESS_ENV

__all__ = ["build_parser", "main", "version"]
from orchestrator.core.progress import govern_libraries

__all__ = ["build_parser", "main", "smooth_images", "version"]

DISTRIBUTION = "flowpp-orchestrator"


def version() -> str:
    """The installed version of the ``flowpp-orchestrator`` distribution, or ``unknown``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:
        return f"unknown ({DISTRIBUTION} is not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowpp",
        description="Train, search, evaluate and promote Flow++ models on Ray, S3 and MLflow.",
        formatter_class=DefaultsFormatter,
    )
    add_global(parser, LEVELS, version())
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return USER_MISTAKE
    if args.progress:
        os.environ[PROGRESS_ENV] = args.progress  # read by every bar, here and in processes started from here
    govern_libraries()  # MLflow's bars follow the same choice
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except FlowppError as exc:
        if args.debug:
            from orchestrator.core.redact import redact  # lazy: flowpp --help loads only what it shows

            print(redact(traceback.format_exc()), end="", file=sys.stderr)
        lines = str(exc).splitlines() or [type(exc).__name__]
        print(f"flowpp {args.command}: {lines[0]}", *lines[1:], sep="\n", file=sys.stderr)
        return exc.exit_code
