"""One logging setup, called once by each process entry point (the CLI, a Ray Train worker,
a Tune trial's driver). Every module logs through ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (Ray and pytest replace it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str = "INFO") -> None:
    """Route every logger to stderr in one format; a second call only changes the level.

    A process whose root logger already has handlers keeps them and gets only the level: a
    Ray Train worker's root logger writes to Ray's console (streamed to the driver) and to
    its application log file, and a second handler would print every line twice.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())
