import sys

import pytest
import torch

from tests import sockets

_WATCH = pytest.StashKey[sockets.Watch]()


def pytest_sessionstart(session):
    """Every listening socket of a Ray process the tests start is watched from here on (Linux)."""
    if sys.platform.startswith("linux"):
        session.config.stash[_WATCH] = sockets.Watch().start()


def pytest_sessionfinish(session, exitstatus):
    """The session fails if a Ray process it started listened anywhere but on loopback."""
    watch = session.config.stash.get(_WATCH, None)
    offenders = watch.stop() if watch is not None else []
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def say(line: str, **markup) -> None:
        reporter.write_line(line, **markup) if reporter else print(line, file=sys.stderr)

    if offenders:
        say(f"Ray listened off loopback ({len(offenders)} socket(s)); a Ray a test starts binds 127.0.0.1:", red=True)
        for o in offenders:
            say(f"  {o}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


from tests.mlflowfixtures import mlflow_server  # noqa: E402,F401  (fixtures)
from tests.s3fixtures import aws_env, s3, s3_endpoint  # noqa: E402,F401  (fixtures)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after; yields dynamo's counters (graphs, breaks)."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.fixture
def root():
    """The root logger, its handlers and level restored afterwards (pytest adds its own during a test)."""
    import logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield root
    root.handlers, root.level = saved, level
