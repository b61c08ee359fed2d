"""flowpp logs, status and stop against a real Ray head (token auth, loopback, job server on)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.driver import rayauth
from tests.s3fixtures import free_port

pytestmark = pytest.mark.e2e

SLEEPER = f"{sys.executable} -c \"import time; print('hello-flowpp', flush=True); time.sleep(60)\""
QUICK = f"{sys.executable} -c \"print('quick-flowpp-done')\""


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group `ray start` leads: every Ray process it made
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with its dashboard and job server on loopback, token auth on; yields its address."""
    state = tmp_path_factory.mktemp("head")
    token = rayauth.write_token_file(state / "token")
    temp_dir = tempfile.mkdtemp(prefix="fpj-")  # short: Ray's socket paths must fit 107 bytes
    dash = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", rayauth.TOKEN_VAR)}
    # a one-node head has nothing to drain on SIGTERM (30 s by default, against a GCS already stopping)
    env.update(
        rayauth.token_auth_env(token), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"
    )
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--include-dashboard=true", f"--dashboard-agent-listen-port={free_port()}",
           f"--ray-client-server-port={free_port()}"]  # fmt: skip
    with open(state / "ray.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    patch = pytest.MonkeyPatch()
    for var in (rayauth.MODE_VAR, rayauth.TOKEN_VAR, rayauth.PATH_VAR, "RAY_ADDRESS"):
        patch.delenv(var, raising=False)  # put back at the end
    try:
        rayauth.enable(token)  # the token for this process's JobSubmissionClient
        address = f"http://127.0.0.1:{dash}"
        _wait_for_job_server(address, proc, state / "ray.log")
        yield address
    finally:
        _stop_group(proc)
        patch.undo()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_server(address: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not serve jobs at {address}:\n{log.read_text()[-3000:]}")
            time.sleep(1)


def _wait_until(check, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_status_logs_and_stop_of_a_running_job(ray_head, capsys):
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_head)
    job_id = jobs.submit_job(entrypoint=SLEEPER)
    _wait_until(lambda: "hello-flowpp" in jobs.get_job_logs(job_id), what="the job's first line")

    assert main(["status", job_id, "--address", ray_head]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {job_id}: RUNNING\n") and "entrypoint: " in out and "hello-flowpp" in out
    assert "ended:      -" in out and "started:    20" in out

    assert main(["logs", job_id, "--no-follow", "--address", ray_head]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()  # the job's line once, and Ray's; Ray may write its own after the job's (CI)
    assert lines.count("hello-flowpp") == 1 and any(f"Running entrypoint for job {job_id}" in line for line in lines)

    assert main(["stop", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out == f"job {job_id}: STOPPED\n"
    assert main(["status", job_id, "--address", ray_head]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {job_id}: STOPPED\n") and "ended:      20" in out

    assert main(["logs", job_id, "--address", ray_head]) == 1  # following a stopped job: ends at once, exit 1
    out, err = capsys.readouterr()
    assert "hello-flowpp" in out and err == f"job {job_id}: STOPPED\n"
    assert main(["stop", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out == f"job {job_id}: already STOPPED; nothing to stop\n"


@pytest.mark.slow
def test_logs_follow_a_job_to_its_end_with_the_address_from_ray_address(ray_head, capsys, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    job_id = JobSubmissionClient(ray_head).submit_job(entrypoint=QUICK)
    assert main(["logs", job_id]) == 0  # follows until the job ends
    out, err = capsys.readouterr()
    assert "quick-flowpp-done" in out and err == f"job {job_id}: SUCCEEDED\n"


def test_submit_and_logs_mask_what_a_job_prints_alike(ray_head, capsys, monkeypatch):
    """flowpp submit's own log stream masks secrets as flowpp logs does: URL user-info, and the value
    of every credential-named variable of this environment."""
    from ray.job_submission import JobSubmissionClient

    from orchestrator.driver.submit import follow_logs

    fake = "fake-" + os.urandom(8).hex()
    monkeypatch.setenv("SERVICE_PASSWORD", fake)
    printer = f"{sys.executable} -c \"print('url https://alice:{fake}@db.example/x'); print('token {fake} end')\""
    client = JobSubmissionClient(ray_head)
    job_id = client.submit_job(entrypoint=printer)
    assert follow_logs(client, job_id, poll_s=0.2) == 0
    followed = capsys.readouterr().out
    assert main(["logs", job_id, "--no-follow", "--address", ray_head]) == 0
    logged = capsys.readouterr().out
    for out in (followed, logged):
        assert "url https://***@db.example/x" in out and "token *** end" in out and fake not in out, out


@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_an_unknown_job_id_is_one_line_naming_it(ray_head, command, capsys):
    assert main([command, "raysubmit_nosuchjob", "--address", ray_head]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"flowpp {command}: no job raysubmit_nosuchjob on the Ray cluster at {ray_head}\n"


@pytest.mark.slow
def test_an_unreachable_address_is_one_line_naming_it(capsys):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["status", "raysubmit_x", "--address", address]) == 1
    err = capsys.readouterr().err
    assert err == f"flowpp status: the Ray job server at {address} is unreachable (is the cluster up?)\n"
