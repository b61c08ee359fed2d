"""The Ray that ``flowpp train`` starts inside its own process (no RAY_ADDRESS): token auth on,
and every socket of every process it spawns listening on loopback only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.rayauth import token_auth

pytestmark = pytest.mark.integration

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(root) -> list[tuple[str, str, int]]:
    import psutil

    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return found


def _addresses() -> tuple[str, str]:
    """In a worker: RAY_ADDRESS, and the State API's URL as Ray's code finds it without an address."""
    from ray.dashboard.utils import get_address_for_submission_client

    return os.environ.get("RAY_ADDRESS", ""), get_address_for_submission_client(None)


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only_with_token_auth(tmp_path, monkeypatch):
    import shutil
    import tempfile

    import psutil
    import ray

    from orchestrator.driver.launch import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")  # restored after the test
    # a cluster recorded by a `ray start` of this machine (here a dead one, in a temp dir of this
    # test's): a bare ray.init() would join it; the embedded Ray starts its own all the same
    short = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    (Path(short) / "ray").mkdir()
    (Path(short) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    monkeypatch.setenv("RAY_TMPDIR", short)
    auth = token_auth(tmp_path)
    saved = ray._private.ray_constants.ENABLE_RAY_CLUSTER
    try:
        init_ray(None)  # type: ignore[arg-type]  (the spec is not read on this path)
        sockets = _listening(psutil.Process())
        assert os.environ["RAY_AUTH_MODE"] == "token"
        assert len(sockets) >= 5, sockets  # GCS, raylet, agents, workers: found, so the check can fail
        assert [s for s in sockets if s[1] not in LOOPBACK] == []
        # its dashboard agent on a port of its own, not the 52365 every other ray.init takes (two
        # Rays on one machine: the second agent could not bind, and its node died as it started)
        assert not [s for s in sockets if s[2] == 52365], sockets
        from ray._private.parameter import RayParams

        assert RayParams().dashboard_agent_listen_port == 52365  # Ray's default, put back after the init
        # its workers name it when they reach the State API without an address, as Ray Train's
        # placement-group cleaner does: not the newest of the machine's Rays (the other lane's)
        own = ray.get_runtime_context().gcs_address
        assert ray.get(ray.remote(num_cpus=0)(_addresses).remote()) == (
            own,
            f"http://{ray._private.worker.get_dashboard_url()}",
        )
    finally:
        ray.shutdown()
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = saved
        auth.restore()
        shutil.rmtree(short, ignore_errors=True)
