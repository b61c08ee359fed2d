"""Security checkers for infra/kuberay/ and infra/aws/: who reaches the Ray ports, who holds a token,
what a container may do. Each returns the problems it finds, so that a test of a broken manifest
can show it fails.
"""

from __future__ import annotations

import ipaddress
import itertools
import shlex

RAY_PORTS = {6379: "GCS", 8265: "dashboard/job API", 10001: "Ray client"}
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# What Ray's KubeRay autoscaler calls (ray/autoscaler/_private/kuberay/node_provider.py): list and get
# pods, get and patch its RayCluster. Nothing else, and never a wildcard.
AUTOSCALER_VERBS = {("", "pods"): {"get", "list", "watch"}, ("ray.io", "rayclusters"): {"get", "patch"}}


# --- pods and containers ----------------------------------------------------------------------


def pod_specs(doc) -> list[dict]:
    """Every pod spec anywhere in a manifest: the dicts that hold a ``containers`` list."""
    found = []
    if isinstance(doc, dict):
        if isinstance(doc.get("containers"), list):
            found.append(doc)
        for value in doc.values():
            found.extend(pod_specs(value))
    elif isinstance(doc, list):
        for value in doc:
            found.extend(pod_specs(value))
    return found


def autoscaler_container(cluster: dict) -> dict | None:
    """The sidecar KubeRay adds to the head pod, as far as the manifest shapes it."""
    if not cluster["spec"].get("enableInTreeAutoscaling"):
        return None
    options = cluster["spec"].get("autoscalerOptions", {})
    return {"name": "autoscaler", "securityContext": options.get("securityContext"), **options}


def container_problems(pod: dict, container: dict) -> list[str]:
    """The restricted Pod Security profile plus a read-only root, for one container in ``pod``."""
    name = container["name"]
    ctx = container.get("securityContext") or {}
    pod_ctx = pod.get("securityContext") or {}
    problems = []
    if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
        problems.append(f"{name}: runAsNonRoot is not true")
    if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
        problems.append(f"{name}: runs as uid 0")
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation is not false")
    if ctx.get("privileged"):
        problems.append(f"{name}: privileged")
    if "ALL" not in (ctx.get("capabilities") or {}).get("drop", []):
        problems.append(f"{name}: capabilities do not drop ALL")
    if (ctx.get("capabilities") or {}).get("add"):
        problems.append(f"{name}: adds capabilities {ctx['capabilities']['add']}")
    if ctx.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: root filesystem is writable")
    seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{name}: seccompProfile is {seccomp}, not RuntimeDefault")
    if ctx.get("readOnlyRootFilesystem") and "/tmp" not in {m["mountPath"] for m in container.get("volumeMounts", [])}:
        problems.append(f"{name}: read-only root without a writable /tmp")
    return problems


def security_context_problems(doc: dict) -> list[str]:
    problems = [
        p
        for pod in pod_specs(doc)
        for c in pod["containers"] + pod.get("initContainers", [])
        for p in container_problems(pod, c)
    ]
    if doc["kind"] == "RayCluster" and (sidecar := autoscaler_container(doc)):
        problems += container_problems(doc["spec"]["headGroupSpec"]["template"]["spec"], sidecar)
    return problems


def _token_volumes(pod: dict) -> set[str]:
    """Volumes of ``pod`` that project a service-account token."""
    names = set()
    for volume in pod.get("volumes", []):
        sources = (volume.get("projected") or {}).get("sources", [])
        if any("serviceAccountToken" in s for s in sources):
            names.add(volume["name"])
    return names


def token_problems(doc: dict) -> list[str]:
    """Pods mount no Kubernetes API token; with autoscaling, the autoscaler sidecar alone gets one."""
    problems = []
    for pod in pod_specs(doc):
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"a pod of {doc['kind']} {doc['metadata']['name']} automounts its token")
        tokens = _token_volumes(pod)
        for container in pod["containers"] + pod.get("initContainers", []):
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            if mounted & tokens or TOKEN_PATH in {m["mountPath"] for m in container.get("volumeMounts", [])}:
                problems.append(f"{container['name']} mounts a service-account token")
    if doc["kind"] == "RayCluster":
        head = doc["spec"]["headGroupSpec"]["template"]["spec"]
        sidecar = autoscaler_container(doc)
        mounts = {m["name"]: m for m in (sidecar or {}).get("volumeMounts", [])}
        if sidecar and not any(mounts.get(v, {}).get("mountPath") == TOKEN_PATH for v in _token_volumes(head)):
            problems.append("autoscaling is on but the autoscaler gets no token")
        if not sidecar and _token_volumes(head):
            problems.append("a token is projected though no autoscaler needs it")
    return problems


def rbac_problems(doc: dict) -> list[str]:
    """No cluster-wide grant, no wildcard, nothing beyond what the autoscaler calls."""
    if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
        return [f"{doc['kind']} {doc['metadata']['name']}: the Ray cluster needs namespace rights only"]
    if doc["kind"] != "Role":
        return []
    problems = []
    for rule in doc.get("rules", []):
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                allowed = AUTOSCALER_VERBS.get((group, resource))
                if allowed is None:
                    problems.append(f"Role {doc['metadata']['name']}: {group or 'core'}/{resource} is not needed")
                    continue
                extra = set(rule.get("verbs", [])) - allowed
                if extra:
                    problems.append(f"Role {doc['metadata']['name']}: {resource} verbs {sorted(extra)} not needed")
        if "nonResourceURLs" in rule:
            problems.append(f"Role {doc['metadata']['name']}: nonResourceURLs")
    return problems


# --- NetworkPolicy: who reaches which port of a pod -------------------------------------------


def _selects(selector: dict | None, labels: dict) -> bool:
    """A label selector against labels; an empty selector matches everything."""
    if selector is None:
        return False
    if selector.get("matchExpressions"):
        raise ValueError("matchExpressions are not modelled here; use matchLabels")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_admits(peer: dict, policy_namespace: str, source: dict) -> bool:
    if "ipBlock" in peer:
        net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        return source.get("ip") is not None and ipaddress.ip_address(source["ip"]) in net
    namespace_labels = {"kubernetes.io/metadata.name": source["namespace"]}
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif source["namespace"] != policy_namespace:
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"], source["labels"])


def _port_admits(ports: list[dict] | None, port: int) -> bool:
    if not ports:
        return True  # no ports listed: every port
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in entry:
            return True
        if not isinstance(entry["port"], int):
            raise ValueError(f"named port {entry['port']!r}: use numbers in these policies")
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def reachable(policies: list[dict], target: dict, source: dict, port: int) -> bool:
    """Whether ``source`` ({namespace, labels} or {ip}) may open TCP ``port`` on pod ``target``
    ({namespace, labels}), under Kubernetes' rules: a pod no ingress policy selects accepts everyone;
    otherwise the union of the selecting policies' rules applies."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == target["namespace"]
        and _selects(p["spec"]["podSelector"], target["labels"])
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            admitted = not peers or any(_peer_admits(peer, policy["metadata"]["namespace"], source) for peer in peers)
            if admitted and _port_admits(rule.get("ports"), port):
                return True
    return False


# --- AWS: security groups and Ray's token on the nodes ----------------------------------------


def _covers(permission: dict, port: int) -> bool:
    if str(permission.get("IpProtocol")) in ("-1", "all"):
        return True
    if permission.get("IpProtocol") != "tcp":
        return False
    return permission.get("FromPort", 0) <= port <= permission.get("ToPort", 65535)


def world_open(permissions: list[dict], ports=(22, *RAY_PORTS)) -> list[str]:
    """Ingress rules that admit the whole IPv4 or IPv6 internet to any of ``ports``."""
    problems = []
    for permission in permissions:
        wide = [r["CidrIp"] for r in permission.get("IpRanges", []) if r["CidrIp"].endswith("/0")]
        wide += [r["CidrIpv6"] for r in permission.get("Ipv6Ranges", []) if r["CidrIpv6"].endswith("/0")]
        for port in ports:
            if wide and _covers(permission, port):
                problems.append(f"port {port} open to {', '.join(wide)}")
    return problems


def launcher_ingress(config: dict, own_group: list[dict]) -> list[dict]:
    """The ingress rules the launched nodes get: Ray's own group when a node type names no
    SecurityGroupIds (ray/autoscaler/_private/aws/config.py), else ``own_group``, the group that
    infra/README.md has you create."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    if all("SecurityGroupIds" in t["node_config"] for t in config["available_node_types"].values()):
        return own_group
    extended = config["provider"].get("security_group", {}).get("IpPermissions", [])
    return _create_default_inbound_rules({"sg-ray-created"}, extended)


def _env_options(run_options: list[str]) -> dict[str, str]:
    """The variables that `docker run` options set: ``-e K=V``, ``--env K=V`` or ``--env=K=V``."""
    words = [w for option in run_options for w in shlex.split(option)]
    assignments = [value for flag, value in itertools.pairwise(words) if flag in ("-e", "--env")]
    assignments += [w.removeprefix("--env=") for w in words if w.startswith("--env=")]
    return dict(a.split("=", 1) for a in assignments if "=" in a)


def aws_token_problems(raw: dict) -> list[str]:
    """RAY_AUTH_MODE=token in every container, the token file copied to Ray's default path and made
    0600, and no token value in the config."""
    problems = []
    env = _env_options(raw.get("docker", {}).get("run_options", []))
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("the containers do not run with RAY_AUTH_MODE=token")
    if "RAY_AUTH_TOKEN" in env:
        problems.append("the token itself is in docker run_options")
    if "~/.ray/auth_token" not in raw.get("file_mounts", {}):
        problems.append("no token file is provisioned at ~/.ray/auth_token")
    commands = raw.get("setup_commands", []) + raw.get("head_setup_commands", [])
    if not any("chmod 600 ~/.ray/auth_token" in c for c in commands):
        problems.append("the token file is not made mode 0600")
    starts = raw.get("head_start_ray_commands", []) + raw.get("worker_start_ray_commands", [])
    if "head_start_ray_commands" not in raw or any("--dashboard-host=0.0.0.0" in c for c in starts):
        problems.append("the dashboard listens on 0.0.0.0 (Ray's default head_start_ray_commands)")
    return problems
