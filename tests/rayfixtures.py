"""Ray as tests start it: on loopback, with token authentication.

Ray swaps 127.0.0.1 for the machine's routable address (and its servers then listen on every
interface) unless it believes it is a one-machine cluster: ``loopback()`` makes it believe so,
for this process (the constant Ray read at import) and for the processes it spawns (the
variable), and puts both back afterwards. ``local_ray`` starts a one-node Ray inside it, its
GCS port chosen and named to its workers (``orchestrator.driver.launch.own_address``);
``tests/integration/test_multinode.py`` builds its two-node ``Cluster`` inside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

LOOPBACK = "127.0.0.1"


@contextmanager
def loopback() -> Iterator[None]:
    from ray._private import ray_constants

    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_const = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved_env


@contextmanager
def local_ray(num_cpus: int, **init) -> Iterator[None]:
    """``ray.init`` of a one-node Ray on loopback (no dashboard unless asked), shut down afterwards.
    Token authentication must be on already (tests.rayauth.token_auth)."""
    import ray

    from orchestrator.driver.launch import own_address

    assert os.environ.get("RAY_AUTH_MODE") == "token", "start Ray in tests with token auth (tests.rayauth)"
    with loopback(), own_address(LOOPBACK) as runtime_env:  # its workers find it, not another lane's Ray
        ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus,
                 include_dashboard=init.pop("include_dashboard", False), runtime_env=runtime_env, **init)  # fmt: skip
        try:
            yield
        finally:
            ray.shutdown()
