"""Progress bars (tqdm) for the long loops a user waits on: evaluation, scoring, sampling.

On stderr, counting images with their rate (``img/s``). ``FLOWPP_PROGRESS`` chooses how:

- ``auto`` (the default): a live bar in a terminal; in a log (stderr not a terminal: a Ray job,
  CI) one plain line every ``LOG_INTERVAL_S`` seconds, and nothing at all for a loop shorter
  than that, so that the training loop's quick periodic evaluations add no lines;
- ``on``: a live bar wherever stderr goes;
- ``off``: no bar; so does tqdm's own ``TQDM_DISABLE=1`` (read here at each bar, not only when
  tqdm is imported as tqdm itself does).

In a distributed run only rank 0 shows a bar: every rank runs the same loop.

The same choice governs the libraries' own bars (``govern_libraries``): MLflow's "Downloading
artifacts" bar is a live bar or nothing, so it shows only where ours would be live.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm

from orchestrator.core.errors import UserError

ENV = "FLOWPP_PROGRESS"
MODES = ("auto", "on", "off")
LOG_INTERVAL_S = 30.0
"""In a log: the first line after this long, then one line this often."""


class _Lines:
    """A file for tqdm that turns its in-place updates (``\\r`` + text) into one line each, so a
    log holds readable lines rather than one line of carriage returns. Writes to whatever
    ``sys.stderr`` is at the time."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def mode() -> str:
    """``FLOWPP_PROGRESS`` (auto, on or off); an unknown value names the variable."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise UserError(f"{ENV}={value!r}: must be one of {', '.join(MODES)}")
    return value


def _tqdm_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def live() -> bool:
    """Whether a bar here would be a live one (``on``, or ``auto`` in a terminal)."""
    chosen = mode()
    return not _tqdm_disabled() and (chosen == "on" or (chosen == "auto" and sys.stderr.isatty()))


LIBRARY_SWITCHES = ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",)
"""Environment variables that turn a library's own progress bars on or off."""


def govern_libraries() -> None:
    """Turn the libraries' bars on where ours would be live and off elsewhere (a log, ``off``): their
    in-place updates would be one line of carriage returns in a log. A switch the user set is kept.
    Set in the environment, so processes started from here follow it too."""
    value = "true" if live() else "false"
    for name in LIBRARY_SWITCHES:
        os.environ.setdefault(name, value)


def bar(desc: str, total: int | None = None, unit: str = "img") -> tqdm:
    """A progress bar counting ``unit`` (``bar.update(n)`` after each batch), on stderr. Counts are
    exact (12345/50000), not scaled (12.3k/50.0k): an image count reads better whole."""
    settings: dict[str, Any] = {}
    chosen = mode()
    if chosen == "off" or _tqdm_disabled() or _rank() != 0:
        settings["disable"] = True
    elif chosen == "auto" and not sys.stderr.isatty():
        settings.update(file=_Lines(), mininterval=LOG_INTERVAL_S, delay=LOG_INTERVAL_S, ascii=True)
    else:
        settings["file"] = sys.stderr
    return tqdm(desc=desc, total=total, unit=unit, dynamic_ncols=True, **settings)
