"""infra/aws/ray-cluster.yaml: Ray's cluster-launcher schema, after Ray's own defaults."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from tests.infra.checks import INFRA, prepared_aws_config

pytestmark = [pytest.mark.unit, pytest.mark.infra]


def test_aws_cluster_config_matches_ray_schema():
    raw = yaml.safe_load((INFRA / "aws" / "ray-cluster.yaml").read_text())
    config = prepared_aws_config(raw)
    assert config["provider"]["type"] == "aws"
    workers = config["available_node_types"]["gpu_8x"]
    assert workers["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert 0 == workers["min_workers"] < workers["max_workers"] <= config["max_workers"]
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert raw["setup_commands"] and raw["docker"]["image"]


@pytest.mark.parametrize("breaks", ["docker", "node_type"])
def test_ray_schema_rejects_unknown_fields(breaks):
    raw = yaml.safe_load((INFRA / "aws" / "ray-cluster.yaml").read_text())
    if breaks == "docker":
        raw["docker"]["shm_size"] = "64g"  # plausible, but Ray sizes /dev/shm itself
    else:
        raw["available_node_types"]["gpu_8x"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError):
        prepared_aws_config(raw)
