"""Two Ray nodes (ray.cluster_utils.Cluster), 2 workers placed STRICT_SPREAD."""

import pytest

from orchestrator.config import validate
from tests.integration.test_train_ray import job, trace
from tests.rayauth import token_auth

pytestmark = pytest.mark.integration


def test_two_nodes_strict_spread_end_with_identical_parameters(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.driver.launch import run_training

    auth = token_auth(tmp_path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
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
