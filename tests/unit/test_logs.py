"""setup_logging: one handler and one format, never a second handler beside an existing one."""

import logging

import pytest

from orchestrator.core.logs import setup_logging

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


def test_ray_trains_per_report_lines_are_off_at_info_and_back_at_debug(root, capsys):
    """Ray's own logger, from its own file, as a Ray Train worker emits the line on every report."""
    import ray.train.v2._internal.execution.context as ray_context

    root.handlers = []
    ray_logger = logging.getLogger(ray_context.__file__)  # Ray names this logger after its source file
    line = "Reporting training result 7: TrainingReport(checkpoint=None, metrics={'step': 7}) from rank 1"

    setup_logging("INFO")
    ray_logger.info(line)
    ray_logger.warning("a Ray Train warning stays")
    logging.getLogger("orchestrator.training.loop").info("step 7/10  bits/dim 4.0")
    err = capsys.readouterr().err
    assert "Reporting training result" not in err
    assert "a Ray Train warning stays" in err and "step 7/10  bits/dim 4.0" in err

    setup_logging("DEBUG")  # --log-level debug
    ray_logger.info(line)
    assert "Reporting training result 7" in capsys.readouterr().err


def test_botocores_credential_lines_are_off_at_info_and_back_at_debug(root, capsys):
    root.handlers = []
    credentials = logging.getLogger("botocore.credentials")
    setup_logging("INFO")
    credentials.info("Found credentials in environment variables.")
    credentials.warning("a credential warning stays")
    err = capsys.readouterr().err
    assert "Found credentials" not in err and "a credential warning stays" in err
    setup_logging("DEBUG")
    credentials.info("Found credentials in environment variables.")
    assert "Found credentials" in capsys.readouterr().err
    setup_logging("INFO")  # the level this process had
