"""infra/kuberay/: Ray token auth, the NetworkPolicies, service-account tokens and RBAC, and the
containers' security contexts. Each check also meets a manifest broken on purpose."""

from __future__ import annotations

import copy

import pytest

from tests.infra.checks import INFRA, by_kind, crd_errors, docs, inline_secrets, kuberay_crd_schemas
from tests.infra.security import (
    RAY_PORTS,
    rbac_problems,
    reachable,
    security_context_problems,
    token_problems,
)

pytestmark = [pytest.mark.unit, pytest.mark.infra]

BASE = INFRA / "kuberay" / "base.yaml"


def _cluster() -> dict:
    (cluster,) = docs(INFRA / "kuberay" / "raycluster.yaml")
    return cluster


def _job() -> dict:
    (job,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    return job


def _policies() -> list[dict]:
    return [d for d in docs(BASE) if d["kind"] == "NetworkPolicy"]


def _submitter(job: dict) -> dict:
    return job["spec"]["submitterPodTemplate"]


# --- token auth -------------------------------------------------------------------------------


def auth_problems(cluster: dict, job: dict) -> list[str]:
    options = cluster["spec"].get("authOptions") or {}
    if options.get("mode") != "token":
        return ["RayCluster: authOptions.mode is not token"]
    secret = options.get("secretName")
    if not secret:
        return ["RayCluster: no authOptions.secretName (the submitter needs the Secret's name)"]
    (submitter,) = _submitter(job)["spec"]["containers"]
    env = {e["name"]: e for e in submitter.get("env", [])}
    problems = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append("submitter: RAY_AUTH_MODE is not token")
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    if ref != {"name": secret, "key": "auth_token"}:
        problems.append(f"submitter: RAY_AUTH_TOKEN is not {secret}/auth_token (got {ref})")
    return problems


def test_ray_token_auth_from_a_secret():
    cluster, job = _cluster(), _job()
    assert auth_problems(cluster, job) == []
    # Never inline: every *TOKEN* variable is a secretKeyRef, and no Secret is committed.
    assert inline_secrets(cluster) == inline_secrets(job) == []
    assert all(d["kind"] != "Secret" for d in docs(BASE))


def _auth_disabled(cluster, job):
    cluster["spec"]["authOptions"]["mode"] = "disabled"


def _auth_removed(cluster, job):
    del cluster["spec"]["authOptions"]


def _submitter_without_token(cluster, job):
    _submitter(job)["spec"]["containers"][0]["env"] = []


def _token_from_another_secret(cluster, job):
    cluster["spec"]["authOptions"]["secretName"] = "other"


@pytest.mark.parametrize(
    "breaks", [_auth_disabled, _auth_removed, _submitter_without_token, _token_from_another_secret]
)
def test_auth_check_rejects(breaks):
    cluster, job = _cluster(), _job()
    breaks(cluster, job)
    assert auth_problems(cluster, job)


def test_inline_ray_token_is_rejected():
    job = _job()
    _submitter(job)["spec"]["containers"][0]["env"][1] = {"name": "RAY_AUTH_TOKEN", "value": "0123abcd"}
    assert inline_secrets(job)


def test_crd_rejects_an_unknown_auth_mode():
    cluster = _cluster()
    cluster["spec"]["authOptions"]["mode"] = "password"
    assert crd_errors(kuberay_crd_schemas(), cluster)


# --- NetworkPolicy ----------------------------------------------------------------------------

HEAD = {"namespace": "flowpp", "labels": {"ray.io/cluster": "flowpp", "ray.io/node-type": "head"}}
WORKER = {"namespace": "flowpp", "labels": {"ray.io/cluster": "flowpp", "ray.io/node-type": "worker"}}
OPERATOR = {"namespace": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}
STRANGERS = {
    "pod in flowpp (MLflow)": {"namespace": "flowpp", "labels": {"app": "mlflow"}},
    "client label, other namespace": {"namespace": "default", "labels": {"flowpp.io/ray-client": "true"}},
    "operator label, other namespace": {
        "namespace": "default",
        "labels": {"app.kubernetes.io/name": "kuberay-operator"},
    },
    "another RayCluster": {"namespace": "flowpp", "labels": {"ray.io/cluster": "other"}},
    "internet": {"ip": "198.51.100.7", "namespace": "", "labels": {}},
}


def _submitter_pod(job: dict) -> dict:
    return {"namespace": job["metadata"]["namespace"], "labels": _submitter(job)["metadata"]["labels"]}


def exposure(policies: list[dict], job: dict) -> dict[tuple[str, str, int], bool]:
    """{(source, target, port): reachable} over the Ray ports, for every source that matters."""
    sources = {"head": HEAD, "worker": WORKER, "submitter": _submitter_pod(job), "operator": OPERATOR, **STRANGERS}
    return {
        (s, t, port): reachable(policies, target, source, port)
        for s, source in sources.items()
        for t, target in {"head": HEAD, "worker": WORKER}.items()
        for port in RAY_PORTS
    }


# Who may open which Ray port on the head; nobody but the cluster's own pods reaches a worker.
ALLOWED = {("submitter", "head", 8265), ("submitter", "head", 10001), ("operator", "head", 8265)}


def network_problems(policies: list[dict], job: dict) -> list[str]:
    problems = []
    for (source, target, port), ok in exposure(policies, job).items():
        internal = source in ("head", "worker")
        if ok and not internal and (source, target, port) not in ALLOWED:
            problems.append(f"{source} reaches {target}:{port} ({RAY_PORTS[port]})")
        if not ok and (internal or (source, target, port) in ALLOWED):
            problems.append(f"{source} cannot reach {target}:{port}, which it needs")
    return problems


def test_network_policy_admits_only_the_cluster_the_submitter_and_the_operator():
    policies, job = _policies(), _job()
    assert {p["metadata"]["namespace"] for p in policies} == {"flowpp"}
    assert network_problems(policies, job) == []


def _no_policies(policies):
    policies.clear()


def _drop_internal_policy(policies):
    policies[:] = [p for p in policies if p["metadata"]["name"] != "flowpp-ray-internal"]


def _client_rule_without_ports(policies):
    del by_name(policies, "flowpp-ray-head-clients")["spec"]["ingress"][0]["ports"]


def _client_rule_from_everyone(policies):
    del by_name(policies, "flowpp-ray-head-clients")["spec"]["ingress"][0]["from"]


def _client_rule_any_namespace(policies):
    by_name(policies, "flowpp-ray-head-clients")["spec"]["ingress"][0]["from"][0]["namespaceSelector"] = {}


def _client_policy_on_every_ray_pod(policies):
    by_name(policies, "flowpp-ray-head-clients")["spec"]["podSelector"] = {"matchLabels": {"ray.io/cluster": "flowpp"}}


def _open_to_the_internet(policies):
    rules = by_name(policies, "flowpp-ray-internal")["spec"]["ingress"]
    rules.append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 8265}]})


def _gcs_for_clients(policies):
    by_name(policies, "flowpp-ray-head-clients")["spec"]["ingress"][0]["ports"].append(
        {"protocol": "TCP", "port": 6379}
    )


def by_name(policies: list[dict], name: str) -> dict:
    (policy,) = [p for p in policies if p["metadata"]["name"] == name]
    return policy


@pytest.mark.parametrize(
    "breaks",
    [
        _no_policies,
        _drop_internal_policy,
        _client_rule_without_ports,
        _client_rule_from_everyone,
        _client_rule_any_namespace,
        _client_policy_on_every_ray_pod,
        _open_to_the_internet,
        _gcs_for_clients,
    ],
)
def test_network_check_rejects(breaks):
    policies = copy.deepcopy(_policies())
    breaks(policies)
    assert network_problems(policies, _job())


def test_submitter_without_its_label_cannot_submit():
    job = _job()
    _submitter(job)["metadata"]["labels"] = {}
    assert "submitter cannot reach head:8265, which it needs" in network_problems(_policies(), job)


# --- service-account tokens and RBAC ----------------------------------------------------------


def test_only_the_autoscaler_holds_a_kubernetes_token():
    cluster = _cluster()
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert token_problems(cluster) == []
    assert token_problems(_job()) == []


def _head_automounts(cluster):
    del cluster["spec"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"]


def _head_container_mounts_token(cluster):
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["volumeMounts"].append(
        {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
    )


def _autoscaler_loses_token(cluster):
    cluster["spec"]["autoscalerOptions"]["volumeMounts"] = [{"name": "autoscaler-tmp", "mountPath": "/tmp"}]


def _token_without_autoscaler(cluster):
    cluster["spec"]["enableInTreeAutoscaling"] = False


@pytest.mark.parametrize(
    "breaks", [_head_automounts, _head_container_mounts_token, _autoscaler_loses_token, _token_without_autoscaler]
)
def test_token_check_rejects(breaks):
    cluster = _cluster()
    breaks(cluster)
    assert token_problems(cluster)


def test_autoscaler_role_is_least_privilege_and_bound_to_the_head():
    base = docs(BASE)
    assert [p for d in base for p in rbac_problems(d)] == []
    role, binding, cluster = by_kind(BASE, "Role"), by_kind(BASE, "RoleBinding"), _cluster()
    # The operator keeps an existing Role named after the cluster instead of creating its own.
    assert role["metadata"]["name"] == cluster["metadata"]["name"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    head_account = cluster["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": head_account, "namespace": "flowpp"}]
    (rayclusters,) = [r for r in role["rules"] if "rayclusters" in r["resources"]]
    assert rayclusters["resourceNames"] == [cluster["metadata"]["name"]]


@pytest.mark.parametrize(
    "rule",
    [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]},
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]},
        {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]},
    ],
)
def test_rbac_check_rejects(rule):
    role = copy.deepcopy(by_kind(BASE, "Role"))
    role["rules"].append(rule)
    assert rbac_problems(role)


def test_rbac_check_rejects_a_cluster_role():
    role = copy.deepcopy(by_kind(BASE, "Role"))
    role["kind"] = "ClusterRole"
    assert rbac_problems(role)


# --- security contexts ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_every_container_is_restricted(name):
    (doc,) = docs(INFRA / "kuberay" / name)
    assert security_context_problems(doc) == []


def _ctx(doc):
    pod = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    return pod, pod["containers"][0]


def _no_context(doc):
    del _ctx(doc)[1]["securityContext"]


def _root(doc):
    pod, _ = _ctx(doc)
    pod["securityContext"] = {**pod["securityContext"], "runAsUser": 0}


def _escalation(doc):
    _ctx(doc)[1]["securityContext"] = {**_ctx(doc)[1]["securityContext"], "allowPrivilegeEscalation": True}


def _keeps_capabilities(doc):
    _ctx(doc)[1]["securityContext"] = {**_ctx(doc)[1]["securityContext"], "capabilities": {"drop": ["NET_RAW"]}}


def _writable_root(doc):
    _ctx(doc)[1]["securityContext"] = {**_ctx(doc)[1]["securityContext"], "readOnlyRootFilesystem": False}


def _unconfined(doc):
    pod, container = _ctx(doc)
    pod["securityContext"] = {k: v for k, v in pod["securityContext"].items() if k != "seccompProfile"}
    container["securityContext"] = {**container["securityContext"], "seccompProfile": {"type": "Unconfined"}}


def _no_tmp(doc):
    _, container = _ctx(doc)
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/tmp"]


def _autoscaler_unrestricted(doc):
    del doc["spec"]["autoscalerOptions"]["securityContext"]


@pytest.mark.parametrize(
    "breaks",
    [
        _no_context,
        _root,
        _escalation,
        _keeps_capabilities,
        _writable_root,
        _unconfined,
        _no_tmp,
        _autoscaler_unrestricted,
    ],
)
def test_security_context_check_rejects(breaks):
    cluster = copy.deepcopy(_cluster())
    breaks(cluster)
    assert security_context_problems(cluster)
