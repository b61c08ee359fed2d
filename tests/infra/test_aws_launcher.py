"""infra/aws/ray-cluster.yaml: Ray's cluster-launcher schema, after Ray's own defaults; the security
group the nodes get and Ray's token auth on them."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from tests.infra.checks import INFRA, prepared_aws_config
from tests.infra.security import aws_token_problems, launcher_ingress, world_open

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


# --- security: no port open to the world, token auth on every node ----------------------------


def _raw() -> dict:
    return yaml.safe_load((INFRA / "aws" / "ray-cluster.yaml").read_text())


def _own_group() -> list[dict]:
    return json.loads((INFRA / "aws" / "security-group-ingress.json").read_text())


def test_nodes_use_the_prepared_security_group_and_nothing_is_world_open():
    config = prepared_aws_config(_raw())
    groups = {tuple(t["node_config"]["SecurityGroupIds"]) for t in config["available_node_types"].values()}
    assert len(groups) == 1  # head and workers share one group, which admits its own members
    ingress = launcher_ingress(config, _own_group())
    assert ingress == _own_group()
    assert world_open(ingress) == []
    (ssh,) = [p for p in ingress if p.get("FromPort") == 22]
    # The admin CIDR is a placeholder that AWS rejects until infra/README.md's sed fills it in.
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == ["ADMIN_CIDR"]
    (internal,) = [p for p in ingress if p.get("UserIdGroupPairs")]
    assert internal["UserIdGroupPairs"][0]["GroupId"] == "SECURITY_GROUP_ID" and "IpRanges" not in internal


@pytest.mark.parametrize("node_type", ["head", "gpu_8x"])
def test_a_node_type_without_the_group_gets_rays_world_open_ssh(node_type):
    """Ray creates its own group for such a node type, and that group opens SSH to 0.0.0.0/0."""
    raw = _raw()
    del raw["available_node_types"][node_type]["node_config"]["SecurityGroupIds"]
    assert "port 22 open to 0.0.0.0/0" in world_open(launcher_ingress(prepared_aws_config(raw), _own_group()))


@pytest.mark.parametrize(
    "permission",
    [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        {"IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
    ],
)
def test_world_open_check_rejects(permission):
    assert world_open([*_own_group(), permission])


def test_ray_token_auth_on_every_node():
    raw = _raw()
    assert aws_token_problems(raw) == []
    # The token file is the one `ray job submit` reads on the launching machine, Ray's default path.
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def _no_auth_mode(raw):
    raw["docker"]["run_options"] = ["--ulimit nofile=65536:65536"]


def _inline_token(raw):
    raw["docker"]["run_options"].append("-e RAY_AUTH_TOKEN=0123abcd")


def _no_token_file(raw):
    del raw["file_mounts"]


def _token_file_left_readable(raw):
    raw["setup_commands"] = raw["setup_commands"][:1]


def _default_head_start(raw):
    del raw["head_start_ray_commands"]


def _dashboard_on_every_interface(raw):
    raw["head_start_ray_commands"][-1] = raw["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0")


@pytest.mark.parametrize(
    "breaks",
    [
        _no_auth_mode,
        _inline_token,
        _no_token_file,
        _token_file_left_readable,
        _default_head_start,
        _dashboard_on_every_interface,
    ],
)
def test_aws_token_check_rejects(breaks):
    raw = _raw()
    breaks(raw)
    assert aws_token_problems(raw)


def test_a_spot_worker_type_of_one_gpu_holds_the_spot_jobs_worker_range():
    import math

    from orchestrator.config import load_job
    from tests.infra.checks import JOB

    config = prepared_aws_config(_raw())
    spot = config["available_node_types"]["gpu_1x_spot"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    spec = load_job(JOB.parent / "imagenet64-spot.yaml")
    eval_nodes = math.ceil(spec.train.eval_task.gpus) if spec.train.eval_task else 0
    assert spot["resources"]["GPU"] == 1 and spot["resources"]["CPU"] >= spec.scaling.cpus_per_worker
    assert spot["min_workers"] == 0 and spot["max_workers"] == spec.scaling.max_workers + eval_nodes
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert sum(t["max_workers"] for t in workers) <= config["max_workers"]
    # a node type's own setup list replaces the global ones: it keeps the token check, for one GPU
    own = _raw()["available_node_types"]["gpu_1x_spot"]["worker_setup_commands"]
    assert "chmod 600 ~/.ray/auth_token && test -s ~/.ray/auth_token" in own
    assert any("n == 1" in c for c in own) and not any("n == 8" in c for c in own)
