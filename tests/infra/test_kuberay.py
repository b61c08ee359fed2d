"""infra/kuberay/: the RayCluster and RayJob against KubeRay's own CRD schemas, and their wiring."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from tests.infra.checks import INFRA, JOB, by_kind, containers, crd_errors, dockerfile_arg, docs, kuberay_crd_schemas

pytestmark = [pytest.mark.unit, pytest.mark.infra]

ENTRYPOINT = "python -m orchestrator train jobs/imagenet64.yaml"


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    return kuberay_crd_schemas()


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_match_the_crds(crd_schemas, name):
    (doc,) = docs(INFRA / "kuberay" / name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(crd_schemas, doc) == []


def _misspelt_container_field(c):
    c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}


def _unknown_spec_field(c):
    c["spec"]["autoscaling"] = True


def _string_replicas(c):
    c["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"


def _bad_quantity(c):
    c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "32 GB"


@pytest.mark.parametrize("breaks", [_misspelt_container_field, _unknown_spec_field, _string_replicas, _bad_quantity])
def test_crd_validation_rejects_broken_clusters(crd_schemas, breaks):
    doc = copy.deepcopy(docs(INFRA / "kuberay" / "raycluster.yaml")[0])
    breaks(doc)
    assert crd_errors(crd_schemas, doc)


def worker_group(cluster: dict, name: str) -> dict:
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    return group


def test_raycluster_shape():
    (cluster,) = docs(INFRA / "kuberay" / "raycluster.yaml")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == dockerfile_arg("RAY_VERSION")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    group = worker_group(cluster, "gpu-8x")
    assert 0 == group["minReplicas"] < group["maxReplicas"]
    pod = group["template"]["spec"]
    worker = pod["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # /dev/shm: a memory-backed volume that holds at least Ray's object store.
    (mount,) = [m for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    shm_gib = int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi"))
    assert shm_gib * 2**30 > int(group["rayStartParams"]["object-store-memory"])
    for container in containers(cluster):
        for key in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][key]), (container["name"], key)


def test_rayjob_runs_the_job_spec_on_the_cluster():
    from orchestrator.config import load_job

    (job,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    (cluster,) = docs(INFRA / "kuberay" / "raycluster.yaml")
    assert job["spec"]["entrypoint"] == ENTRYPOINT
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # The submitter uploads the image's copy of the repository, where the job spec lives.
    workdir = re.search(r"^WORKDIR (\S+)$", (INFRA / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": workdir}
    spec = load_job(JOB)
    assert job["spec"]["entrypointNumCpus"] == spec.ray.entrypoint_num_cpus
    group = worker_group(cluster, "gpu-8x")
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    workers_per_node = int(limits["nvidia.com/gpu"])
    assert spec.scaling.use_gpu and spec.scaling.num_workers <= workers_per_node * group["maxReplicas"]
    assert workers_per_node * spec.scaling.cpus_per_worker <= int(limits["cpu"])


def test_ray_pods_get_s3_access_from_the_irsa_account():
    account = by_kind(INFRA / "kuberay" / "base.yaml", "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/flowpp-training")
    (cluster,) = docs(INFRA / "kuberay" / "raycluster.yaml")
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    assert {p["serviceAccountName"] for p in pods} == {account["metadata"]["name"]}


def test_mlflow_uri_comes_from_config_and_names_the_mlflow_service():
    config = by_kind(INFRA / "kuberay" / "base.yaml", "ConfigMap")
    service = by_kind(INFRA / "mlflow" / "mlflow.yaml", "Service")
    meta = service["metadata"]
    expected = f"http://{meta['name']}.{meta['namespace']}.svc:{service['spec']['ports'][0]['port']}"
    assert config["data"]["MLFLOW_TRACKING_URI"] == expected
    (cluster,) = docs(INFRA / "kuberay" / "raycluster.yaml")
    for container in containers(cluster):
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
    assert "${MLFLOW_TRACKING_URI" in yaml.safe_load(JOB.read_text())["mlflow"]["tracking_uri"]


def test_the_spot_group_holds_the_spot_jobs_worker_range_one_gpu_a_node():
    import math

    from orchestrator.config import load_job

    (cluster,) = docs(INFRA / "kuberay" / "raycluster.yaml")
    group = worker_group(cluster, "gpu-1x-spot")
    spec = load_job(JOB.parent / "imagenet64-spot.yaml")
    assert spec.scaling.elastic and spec.scaling.use_gpu
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"  # a reclaimed node costs one worker
    assert spec.scaling.cpus_per_worker <= int(limits["cpu"])
    eval_nodes = math.ceil(spec.train.eval_task.gpus) if spec.train.eval_task else 0
    # on demand from 0 (an idle cluster holds no GPU) up to the job's maximum and its evaluation node
    assert group["minReplicas"] == group["replicas"] == 0
    assert group["maxReplicas"] == spec.scaling.max_workers + eval_nodes
    assert spec.scaling.min_workers <= group["maxReplicas"]
    # only spot nodes, which taint themselves: the pods tolerate the taint and select the capacity type
    assert pod["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"
    assert {"key": "flowpp.io/spot", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # the notice's time to drain: at least the job's grace, within the two minutes a cloud gives
    assert spec.scaling.preemption.grace_s <= pod["terminationGracePeriodSeconds"] <= 120
    # the same data volumes as the on-demand group: /dev/shm holds the object store
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    shm_gib = int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi"))
    assert shm_gib * 2**30 > int(group["rayStartParams"]["object-store-memory"])
