"""The local stack's S3 endpoint (infra/local/s3server.py) keeps its objects across a stop and a crash."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.s3fixtures import _wait_http, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _start(state: Path, port: int, snapshot_s: float) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "infra/local/s3server.py"), "--port", str(port), "--dir", str(state)]
    proc = subprocess.Popen([*cmd, "--snapshot-s", str(snapshot_s)], stdout=subprocess.PIPE, text=True)
    _wait_http(f"http://127.0.0.1:{port}/")
    return proc


def _client(port: int):
    """The server's own client (infra/local/ is not a package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("s3server", ROOT / "infra/local/s3server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._client(port)


def _wait_for_snapshot(state: Path, key: str, timeout: float = 30.0) -> None:
    index, deadline = state / "kept" / "index.json", time.monotonic() + timeout
    while not (index.exists() and key in index.read_text()):
        assert time.monotonic() < deadline, f"no snapshot of {key} under {state}"
        time.sleep(0.2)


@pytest.mark.slow
def test_objects_survive_a_stop_and_a_crash_after_a_snapshot(tmp_path):
    state, port = tmp_path / "s3", free_port()
    proc = _start(state, port, snapshot_s=3600)
    try:
        s3 = _client(port)
        s3.create_bucket(Bucket="kept")
        s3.put_object(Bucket="kept", Key="kept/on/stop", Body=b"one")
    finally:
        proc.send_signal(signal.SIGTERM)  # as infra/local/down does
        proc.wait(timeout=60)

    proc = _start(state, port, snapshot_s=0.5)
    try:
        s3 = _client(port)
        assert s3.get_object(Bucket="kept", Key="kept/on/stop")["Body"].read() == b"one"
        s3.put_object(Bucket="kept", Key="kept/by/snapshot", Body=b"two")
        _wait_for_snapshot(state, "kept/by/snapshot")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a crash: no dump on the way out
        proc.wait(timeout=60)

    proc = _start(state, port, snapshot_s=3600)
    try:
        s3 = _client(port)
        got = {k: s3.get_object(Bucket="kept", Key=k)["Body"].read() for k in ("kept/on/stop", "kept/by/snapshot")}
        assert got == {"kept/on/stop": b"one", "kept/by/snapshot": b"two"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
