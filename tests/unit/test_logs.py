"""setup_logging: one handler and one format, never a second handler beside an existing one."""

import logging

import pytest

from orchestrator.logs import setup_logging

pytestmark = pytest.mark.unit


def test_a_fresh_process_gets_one_stderr_handler_in_the_one_format(root, capsys):
    root.handlers = []  # as in a fresh process
    setup_logging("info")
    setup_logging("WARNING")  # a second call only changes the level
    assert len(root.handlers) == 1 and root.level == logging.WARNING
    logging.getLogger("orchestrator.somewhere").warning("disk %s", "full")
    logging.getLogger("orchestrator.somewhere").info("not shown")
    err = capsys.readouterr().err
    assert err.endswith(" WARNING orchestrator.somewhere: disk full\n") and "not shown" not in err


def test_a_process_whose_root_is_configured_keeps_its_handlers(root):
    existing = logging.StreamHandler()  # e.g. Ray Train's console handler in a worker
    root.handlers = [existing]
    setup_logging("DEBUG")
    assert root.handlers == [existing] and root.level == logging.DEBUG
