"""MLflow away during a run: at the start, while metrics flow, at registration.

A real MLflow server (sqlite backend, local artifacts) on a loopback port that a test
stops and starts again on the same port; "down" is that port with nothing listening.
MLflow's own HTTP retries are turned off so that each fault shows within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.mlflow_outage import HungServer  # a socket that accepts and never answers
from orchestrator import tracking
from orchestrator.cli import main as cli
from orchestrator.tracking.buffer import MetricBuffer
from orchestrator.tracking.connection import HTTP_TIMEOUT_S
from tests.helpers import initialized_model, tiny_config
from tests.jobs import tiny_job, write_job
from tests.mlflowfixtures import SERVER_ENV
from tests.s3fixtures import _wait_http, free_port

pytestmark = pytest.mark.integration


class Server:
    """An MLflow server on a fixed loopback port, stopped and started by its own pid."""

    def __init__(self, state: Path):
        self.state, self.port = state, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.state}/mlflow.db",
               "--artifacts-destination", f"file://{self.state}/artifacts", "--serve-artifacts"]  # fmt: skip
        log = open(self.state / "server.log", "ab")  # noqa: SIM115  (the child keeps it)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **SERVER_ENV})  # fmt: skip
        log.close()
        _wait_http(f"{self.uri}/health", timeout=120)

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own group: its workers, nobody else
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-faults"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def up(server, monkeypatch):
    """The server, running, with MLflow's default environment: the project sets MLflow's own
    retries to none and its timeout (tracking.connection.HTTP_TIMEOUT_S)."""
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)  # put back as they were after the test
    if server.proc is None:
        server.start()
    yield server
    if server.proc is None:
        server.start()


def _history(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in tracking.client_for(uri).get_metric_history(run_id, key))


def test_an_unreachable_tracking_server_fails_the_job_before_any_work(tmp_path, capsys):
    port = free_port()  # nothing listens there
    uri = f"http://flowpp:pa55word-xyz@127.0.0.1:{port}"
    tree = tiny_job(tmp_path, mlflow__tracking_uri=uri)
    code = cli(["train", str(write_job(tree, tmp_path / "job.yaml"))])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flowpp ")]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(
        f"flowpp train: mlflow.tracking_uri: the MLflow tracking server http://127.0.0.1:{port} is unreachable"
    )
    assert "pa55word" not in err and "Traceback" not in err
    import ray

    # no data prepared, no Ray started, no run directory (so no worker, no GPU)
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs" / tree["name"]).exists()
    assert not ray.is_initialized()


@pytest.mark.slow
def test_metrics_wait_in_a_bounded_queue_while_the_server_is_down_and_are_flushed_at_the_end(up, caplog, tmp_path):
    from orchestrator.tracking.buffer import MetricBuffer

    run_id = tracking.ensure_run(up.uri, "faults", "buffered")
    small_run = tracking.ensure_run(up.uri, "faults", "bounded")
    logger = tracking.RunLogger(up.uri, run_id, retry_budget_s=60)
    logger.metrics({"loss": 1.0}, step=0)
    assert _history(up.uri, run_id, "loss") == [0]  # while the server answers, a report waits until it is sent
    up.stop()
    started = time.perf_counter()
    logger.metrics({"loss": 1.0, "lr": 1e-3}, step=1)  # the send that finds the server gone
    assert time.perf_counter() - started < logger.wait_s + 1.0
    slowest = 0.0
    for step in range(2, 41):
        started = time.perf_counter()
        logger.metrics({"loss": 1.0 / step, "lr": 1e-3}, step=step)
        slowest = max(slowest, time.perf_counter() - started)
    logger.params({"train.lr": 1e-3})
    grid = tmp_path / "samples-00000040.png"
    grid.write_bytes(b"not really a png")
    started = time.perf_counter()
    logger.artifact(grid, "samples")  # the sample grid of an evaluation: queued as well
    slowest = max(slowest, time.perf_counter() - started)
    grid.unlink()  # the trainer's temporary directory goes at once
    assert slowest < 0.05  # a report never waits on the server
    # a queue of 10 points, 25 offered: the oldest are dropped, a params call never is
    small = MetricBuffer(tracking.client_for(up.uri), small_run, max_points=10, first_backoff_s=0.2)
    for step in range(25):
        small.metrics({"loss": float(step)}, step)
    small.call("params", lambda: tracking.RunLogger(up.uri, small_run)._send_missing("params", {"kept": "yes"}))
    assert small.dropped >= 14  # 25 points, 10 queued, at most one in flight
    time.sleep(1.0)  # the background threads have met the outage by now
    assert logger._buffer is not None and logger._buffer.pending() >= 40
    up.start()
    logger.finish()  # flushes, then closes the run
    assert small.close(timeout_s=60) == 0
    assert _history(up.uri, run_id, "loss") == list(range(41))
    client = tracking.client_for(up.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.001"
    assert [f.path for f in client.list_artifacts(run_id, "samples")] == ["samples/samples-00000040.png"]
    steps = _history(up.uri, small_run, "loss")
    assert steps[-10:] == list(range(15, 25)) and len(steps) <= 11  # the newest ten (and the one in flight)
    assert client.get_run(small_run).data.params["kept"] == "yes"
    assert "dropping the oldest" in caplog.text


@pytest.mark.slow
def test_registration_is_retried_until_the_server_returns(up):
    run_id = tracking.ensure_run(up.uri, "faults", "register-later")
    model = initialized_model(tiny_config(image_size=8)).float()
    logger = tracking.RunLogger(up.uri, run_id, retry_budget_s=120)
    up.stop()
    restarter = threading.Timer(2.0, up.start)
    restarter.start()
    started = time.monotonic()
    try:
        version = logger.register_model(model, "faulty", {"val_bpd": "5.25"})
    finally:
        restarter.join()
    assert time.monotonic() - started >= 2.0
    mv = tracking.client_for(up.uri).get_model_version("faulty", version)
    assert mv.run_id == run_id and mv.tags["val_bpd"] == "5.25"
    # a second call (a resubmitted job whose tag write was lost) finds the version, registers nothing new
    assert tracking.RunLogger(up.uri, run_id).register_model(model, "faulty", {"val_bpd": "5.25"}) == version
    assert len(tracking.client_for(up.uri).search_model_versions("name = 'faulty'")) == 1


def test_reports_wait_on_a_hung_server_once_not_at_every_step(monkeypatch):
    """A report waits up to 2 s for its metrics while the server answers; a send stuck on a hung
    server for longer stops every later report from waiting (5 reports: not 5 x 2 s)."""
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    hung = HungServer()
    try:
        logger = tracking.RunLogger(hung.uri, "0" * 32, flush_timeout_s=0.2)
        started = time.monotonic()
        for step in range(5):
            logger.metrics({"train_bpd": 5.0}, step)
        assert time.monotonic() - started < 4.0  # the first report's 2 s, and no more
        logger.flush()
    finally:
        hung.close()


def test_a_report_stops_waiting_when_the_send_in_flight_turns_stuck(monkeypatch):
    """A report that comes while the previous send is 1 s into a hung request waits until that send
    has been in flight for the report's 2 s, about 1 s: not its whole 2 s (the send turns stuck by
    the clock, and nothing else would wake the wait)."""
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    hung = HungServer()
    try:
        buffer = MetricBuffer(tracking.client_for(hung.uri), "0" * 32)
        buffer.metrics({"train_bpd": 5.0}, 0, wait_s=1.0)  # its send now hangs, 1 s in
        started = time.monotonic()
        buffer.metrics({"train_bpd": 5.0}, 1, wait_s=2.0)
        assert 0.5 < time.monotonic() - started < 1.6
        buffer.close(timeout_s=0.2)
    finally:
        hung.close()


@pytest.mark.slow
def test_registration_against_a_hung_server_ends_within_its_budget_and_one_timeout(monkeypatch):
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)  # MLflow's defaults (7 retries, 120 s a try) but for the project's
    hung = HungServer()
    try:
        logger = tracking.RunLogger(hung.uri, "0" * 32, retry_budget_s=3.0)
        model = initialized_model(tiny_config(image_size=8)).float()  # built before the clock starts
        started = time.monotonic()
        with pytest.raises(tracking.RegistrationError) as err:
            logger.register_model(model, "never", {"val_bpd": "5.0"})
        took = time.monotonic() - started
        assert 3.0 <= took <= 3.0 + HTTP_TIMEOUT_S + 2, took  # the budget, one request's timeout, some slack
        assert f"the MLflow server {hung.uri} still fails after 3 s" in str(err.value)
    finally:
        hung.close()


@pytest.mark.slow
def test_registration_gives_up_after_its_budget_with_a_resumable_message(monkeypatch):
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)  # MLflow's defaults, but for what the project sets
    uri = f"http://127.0.0.1:{free_port()}"  # the server is gone
    logger = tracking.RunLogger(uri, "0" * 32, retry_budget_s=2.0)
    started = time.monotonic()
    with pytest.raises(tracking.RegistrationError) as err:
        logger.register_model(initialized_model(tiny_config(image_size=8)).float(), "never", {"val_bpd": "5.0"})
    assert 2.0 <= time.monotonic() - started < 2.0 + HTTP_TIMEOUT_S  # a refused connection fails at once
    text = str(err.value)
    assert f"the MLflow server {uri} still fails after 2 s" in text and "re-submit the same job" in text


@pytest.mark.parametrize("val_bpd", ["nan", None, "inf"])
def test_a_run_whose_val_bpd_is_not_finite_is_never_registered(tmp_path, val_bpd):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.ensure_run(store, "exp", "diverged")
    tags = {"job": "diverged"} if val_bpd is None else {"val_bpd": val_bpd}
    with pytest.raises(tracking.RegistrationRefusedError, match=r"not registered: run \w+ has val_bpd"):
        tracking.RunLogger(store, run_id).register_model(initialized_model(tiny_config(image_size=8)), "m", tags)
    assert tracking.client_for(store).search_model_versions("name = 'm'") == []


def test_a_failed_job_marks_its_run_failed_and_a_resubmission_runs_it_again(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.ensure_run(store, "exp", "job")
    with pytest.raises(ValueError), tracking.run_status_on_exit(store, run_id):
        raise ValueError("a rank failed")
    assert tracking.client_for(store).get_run(run_id).info.status == "FAILED"
    assert tracking.ensure_run(store, "exp", "job") == run_id  # resubmitted: the same run, running again
    assert tracking.client_for(store).get_run(run_id).info.status == "RUNNING"
    with pytest.raises(KeyboardInterrupt), tracking.run_status_on_exit(store, run_id):
        os.kill(os.getpid(), signal.SIGTERM)  # as `ray job stop` does
        time.sleep(5)
    assert tracking.client_for(store).get_run(run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_a_closed_port_while_marking_the_run_never_hides_the_jobs_error(caplog):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match="the real cause"), tracking.run_status_on_exit(uri, "0" * 32):
        raise RuntimeError("the real cause")
    assert "could not be marked FAILED" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("rollback", [False, True])
def test_promote_against_a_server_that_is_down_is_one_line_at_once(capsys, rollback):
    port = free_port()  # nothing listens there
    args = ["promote", "--model", "m", "--tracking-uri", f"http://u:s3cret-pw@127.0.0.1:{port}"]
    started = time.monotonic()
    code = cli([*args, "--rollback"] if rollback else args)
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 20 and "Traceback" not in err
    assert err.strip() == (
        f"flowpp promote: tracking URI: the MLflow tracking server http://127.0.0.1:{port} is unreachable "
        "([Errno 111] Connection refused); start it, or correct --tracking-uri / MLFLOW_TRACKING_URI"
    )
