"""Two Ray nodes (ray.cluster_utils.Cluster), 2 workers placed STRICT_SPREAD, every node on loopback."""

import pytest

from orchestrator.config import validate
from tests.integration.test_train_ray import job, trace
from tests.rayauth import token_auth
from tests.rayfixtures import LOOPBACK, loopback

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_two_nodes_strict_spread_end_with_identical_parameters(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.driver.launch import run_training

    auth = token_auth(tmp_path)
    with loopback():  # both nodes and the driver on 127.0.0.1, not on the machine's address
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": LOOPBACK})
        cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        try:
            ray.init(address=cluster.address, _node_ip_address=LOOPBACK)
            assert {n["NodeManagerAddress"] for n in ray.nodes()} == {LOOPBACK} and len(ray.nodes()) == 2
            tree = job(tmp_path, max_steps=6, checkpoint_every=6, eval_every=6, log_every=3)
            tree["scaling"].update(placement_strategy="STRICT_SPREAD")
            result = run_training(validate(tree))
            assert result.error is None
            finals = [next(r for r in trace(tmp_path, rank) if "final_step" in r) for rank in (0, 1)]
            assert finals[0]["node"] != finals[1]["node"]
            assert finals[0]["params_sha256"] == finals[1]["params_sha256"]
        finally:
            ray.shutdown()
            cluster.shutdown()
    auth.restore()
