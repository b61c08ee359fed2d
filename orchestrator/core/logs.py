"""One logging setup, called once by each process entry point (the CLI, a Ray Train worker,
a Tune trial's driver). Every module logs through ``logging.getLogger(__name__)``.

Every handler it finds or adds gets ``redact.RedactingFilter``: no record reaches a console or a
log file with URL user-info or the value of a credential variable of this process in it.
"""

from __future__ import annotations

import logging
import sys

from orchestrator.core.redact import install_filter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
QUIET_BELOW_DEBUG = ("botocore.credentials", "aiobotocore.credentials")
"""Third-party loggers whose INFO lines ("Found credentials in environment variables.") repeat
without telling anything: shown at ``--log-level debug`` only."""


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

    The redacting filter goes on the root's handlers and on those of every logger configured so
    far (MLflow's and Ray's own console handlers, which do not pass records to the root).
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_BELOW_DEBUG:  # one INFO line per S3 client: every worker, every shard reader
        # a level of their own: a parent's (Ray's AWS module sets `botocore` to WARNING on import) never decides
        logging.getLogger(name).setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)
    loggers = [root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for logger in loggers:
        for each in logger.handlers:
            install_filter(each)
            if not any(isinstance(f, RayTrainReports) for f in each.filters):
                each.addFilter(RayTrainReports())


class RayTrainReports(logging.Filter):
    """Drops Ray Train's INFO lines for every ``ray.train.report`` on every rank ("Reporting training
    result N: TrainingReport(...) from rank R", "Checkpoint successfully created at: ..."), unless the
    root logger is at DEBUG (``--log-level debug``). Ray logs the first through a logger named after
    its source file, outside the ``ray.train`` logger that Ray's own ``LoggingConfig`` level governs,
    so no level setting reaches it. Rank 0 logs one line a checkpoint instead (orchestrator/training/loop.py)."""

    PREFIXES = ("Reporting training result", "Checkpoint successfully created at")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
            return True
        where = f"{record.name} {record.pathname}".replace("\\", "/")  # the logger is named after Ray's file
        if "/ray/train/" not in where:
            return True
        return not str(record.msg).startswith(self.PREFIXES)
