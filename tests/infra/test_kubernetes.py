"""infra/kuberay/base.yaml and infra/mlflow/: Kubernetes objects by kubernetes-validate, strict;
credentials only as references; the MLflow server's shape."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest

from tests.infra.checks import INFRA, K8S_VERSION, all_manifests, by_kind, inline_secrets, k8s_objects

pytestmark = [pytest.mark.unit, pytest.mark.infra]


@pytest.mark.parametrize("name,doc", k8s_objects(), ids=[n for n, _ in k8s_objects()])
def test_kubernetes_objects_validate(name, doc):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validate_rejects_a_misspelt_probe():
    doc = copy.deepcopy(by_kind(INFRA / "mlflow" / "mlflow.yaml", "Deployment"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


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
