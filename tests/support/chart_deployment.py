"""The chart as an operator installs it, on the real node (servers/node.py): the image
built from the shipped Dockerfile, OpenBao with its Kubernetes auth method configured by
scripts/vault-setup.sh against the node's apiserver, a stand-in Linkerd control plane and
a meshed workload whose Pods really run, and `helm install` with an operator's values.

The stand-in control plane: three Deployments named as Linkerd's, each Pod with a
``linkerd-proxy`` container whose trust anchors come from the trust-roots ConfigMap by
``configMapKeyRef`` (the kubelet resolves it when the container starts, as with Linkerd's
``proxy.loadTrustBundleFromConfigMap``). ``linkerd-identity``'s Pod also runs the
identity controller's issuer handling for real (tests/support/identity_controller.py, in
the daemon's image, with the linkerd-check binary mounted): it reads the anchors when it
starts, watches the mounted issuer Secret and records Linkerd's Events.

The meshed workload is what Linkerd's injector writes: the control-plane label, the
trust-root hash annotation and the anchors as a literal env value; the test plays the
injector when it re-creates those Pods.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from ca_daemon.pki.bundle import bundle_hash
from tests.support.servers.helm import Helm
from tests.support.servers.images import BUSYBOX_IMAGE, Image
from tests.support.servers.kube import Kube
from tests.support.servers.node import HOST_IP, Node, wait_for
from tests.support.servers.openbao import OpenBao

ROOT = Path(__file__).resolve().parents[2]
RELEASE = "ca-daemon"
NAMESPACE = "ca-daemon"  # the release's; the Lease and the daemon's Events live here
LINKERD_NS = "linkerd"
KONG_NS = "kong"
APP_NS = "apps"
APP = "payments-api"
PORT = 8080
TRUST_ROOTS = "linkerd-identity-trust-roots"
PROPAGATION_DELAY = timedelta(seconds=10)
ISSUER_SECRET = "linkerd-identity-issuer"
TRUST_ANCHORS = "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS"
LINKERD_DEPLOYMENTS = ("linkerd-destination", "linkerd-identity", "linkerd-proxy-injector")
IDENTITY = "linkerd-identity"
# PID 1 of a busybox container ignores SIGTERM unless told otherwise.
IDLE = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]


def b64(secret: Any, key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


def pods(kube: Kube, namespace: str, selector: str) -> list[dict[str, Any]]:
    listed = kube.get(f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")
    return list(listed["items"]) if listed else []


def is_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def daemon_pods(kube: Kube) -> list[dict[str, Any]]:
    return pods(kube, NAMESPACE, f"app.kubernetes.io/instance={RELEASE}")


def lease_holder(kube: Kube) -> str:
    """The Pod that holds the Lease (its identity is ``<pod>_<random>``), or ''."""
    lease = kube.get(f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{RELEASE}")
    holder: str = ((lease or {}).get("spec") or {}).get("holderIdentity") or ""
    return holder.rpartition("_")[0]


def metric(pod: dict[str, Any], name: str) -> float | None:
    """One unlabelled sample from the Pod's /metrics, scraped at the Pod's own IP."""
    text = httpx.get(f"http://{pod['status']['podIP']}:{PORT}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def api_url(pod: dict[str, Any]) -> str:
    return f"http://{pod['status']['podIP']}:{PORT}"


class ServiceFront:
    """What kube-proxy would do for the daemon's Service (this node has none): each
    connection goes to one of the ready endpoints the endpoint controller lists in the
    Service's EndpointSlices, in turn. Use as a Relay target."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._turn = 0

    def ready(self) -> list[tuple[str, int]]:
        path = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"
        listed = self.kube.get(f"{path}?labelSelector=kubernetes.io/service-name={RELEASE}")
        found = []
        for piece in (listed or {}).get("items", []):
            port = next(p["port"] for p in piece.get("ports") or [] if p.get("name") == "http")
            for endpoint in piece.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready"):
                    found += [(address, port) for address in endpoint["addresses"]]
        return sorted(found)

    def __call__(self) -> tuple[str, int]:
        endpoints = self.ready()
        if not endpoints:
            raise LookupError("no ready endpoint")
        self._turn += 1
        return endpoints[self._turn % len(endpoints)]


# --- Vault ----------------------------------------------------------------------------------


def token_file(kube: Kube, namespace: str, name: str, path: Path, **kwargs: Any) -> Path:
    path.write_text(kube.service_account_token(namespace, name, **kwargs))
    path.chmod(0o600)
    return path


def configure_vault(kube: Kube, bao: OpenBao, workdir: Path) -> None:
    """scripts/vault-setup.sh as docs/vault.md tells an administrator to run it, with Vault
    outside the cluster: a reviewer ServiceAccount bound to system:auth-delegator, whose
    token Vault sends with each TokenReview."""
    kube.create_namespace("vault-auth")
    kube.create_service_account("vault-auth", "token-reviewer")
    kube.bind_cluster_role(
        "vault-token-reviewer", "system:auth-delegator", "vault-auth", "token-reviewer"
    )
    reviewer = token_file(
        kube, "vault-auth", "token-reviewer", workdir / "reviewer.jwt", expiration_seconds=86400
    )
    env = {
        **bao.env(),
        "VAULT_CLI": bao.bao,
        "SA_NAMESPACE": NAMESPACE,
        "SA_NAME": RELEASE,
        "KUBERNETES_HOST": kube.server,
        "KUBERNETES_CA_CERT": str(kube.ca_file),
        "TOKEN_REVIEWER_JWT": str(reviewer),
    }
    result = subprocess.run(
        [str(ROOT / "scripts" / "vault-setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the operator's values --------------------------------------------------------------------


def values(image: Image, kube: Kube, bao: OpenBao, clients: list[dict[str, Any]]) -> dict[str, Any]:
    """What an operator writes (docs/deploying.md shows the same as a worked example)."""
    repository, _, tag = image.name.rpartition(":")
    api_port = kube.server.rpartition(":")[2]
    return {
        "replicaCount": 2,
        "image": {"repository": repository, "tag": tag},
        # This node has no kube-proxy: the Pods reach the apiserver where it listens.
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": HOST_IP},
            {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
        ],
        "config": {
            "trust_domain": "cluster.local",
            "anchor": {
                "backend": "vault",
                "vault": {
                    "address": bao.address,
                    "create_if_missing": False,
                    "auth": {"method": "kubernetes", "role": "ca-daemon", "mount": "kubernetes"},
                },
            },
            "server": {"address": f"0.0.0.0:{PORT}", "auth": "kubernetes"},
            # Lifetimes of minutes, so that the old root retires minutes after the new one
            # took over (it stays until everything under it expired).
            "linkerd": {
                "namespace": LINKERD_NS,
                "restart": "control-plane",
                "emergency_restart": "all",
                "gate": "pods",
                "issuer": {"lifetime": "3m", "rotate_before": "1m"},
            },
            "kong": {
                "delivery": "kubernetes",
                "namespace": KONG_NS,
                "intermediate": {"lifetime": "3m", "rotate_before": "1m"},
                "clients": clients,
            },
            "rotation": {
                "check_interval": "3s",
                "propagation_delay": f"{PROPAGATION_DELAY.seconds}s",
                "clock_skew": "5s",
            },
            "leader_election": {
                "lease_duration": "8s",
                "renew_deadline": "6s",
                "retry_period": "1s",
            },
        },
    }


def client(name: str, service: str | None = None) -> dict[str, Any]:
    """A Kong upstream client; its Secret goes to the Service's namespace when it names one."""
    entry: dict[str, Any] = {
        "name": name,
        "common_name": f"kong.{name}.upstream",
        "secret": f"kong-upstream-{name}",
        "lifetime": "2m",
        "rotate_before": "40s",
    }
    if service:
        entry["service"] = service
    return entry


# --- the workloads ------------------------------------------------------------------------------


def _deployment(
    namespace: str, name: str, anchors: dict[str, Any], annotations: dict[str, str]
) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": {**labels, "linkerd.io/control-plane-ns": LINKERD_NS},
                    "annotations": annotations,
                },
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "linkerd-proxy",
                            "image": BUSYBOX_IMAGE,
                            "imagePullPolicy": "IfNotPresent",
                            "command": IDLE,
                            "env": [{"name": TRUST_ANCHORS, **anchors}],
                        }
                    ],
                },
            },
        },
    }


def install_control_plane(kube: Kube, image: Image) -> None:
    """The stand-in Linkerd control plane; its Pods start once the trust roots exist."""
    ref = {"valueFrom": {"configMapKeyRef": {"name": TRUST_ROOTS, "key": "ca-bundle.crt"}}}
    for name in LINKERD_DEPLOYMENTS:
        deployment = _deployment(LINKERD_NS, name, ref, {})
        if name == IDENTITY:
            _identity_controller(kube, deployment, image)
        kube.apply(deployment)


def _identity_controller(kube: Kube, deployment: dict[str, Any], image: Image) -> None:
    """Run Linkerd's issuer handling in the identity Pod, as its ServiceAccount, which may
    record Events in the control plane's namespace (as Linkerd's chart grants)."""
    kube.create_service_account(LINKERD_NS, IDENTITY)
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"namespace": LINKERD_NS, "name": IDENTITY},
            "rules": [
                {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "get", "patch"]}
            ],
        }
    )
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"namespace": LINKERD_NS, "name": IDENTITY},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": IDENTITY},
            "subjects": [{"kind": "ServiceAccount", "name": IDENTITY, "namespace": LINKERD_NS}],
        }
    )
    script = (ROOT / "tests" / "support" / "identity_controller.py").read_text()
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"namespace": LINKERD_NS, "name": "identity-stand-in"},
            "data": {"identity_controller.py": script},
        }
    )
    checker = os.path.realpath(shutil.which("linkerd-check") or "linkerd-check")
    api_port = kube.server.rpartition(":")[2]
    namespace = {"fieldRef": {"fieldPath": "metadata.namespace"}}
    template = deployment["spec"]["template"]
    template["metadata"]["labels"]["linkerd.io/control-plane-component"] = "identity"
    spec = template["spec"]
    spec["serviceAccountName"] = IDENTITY
    spec["automountServiceAccountToken"] = True
    spec["containers"].append(
        {
            "name": "identity",
            "image": image.name,
            "imagePullPolicy": "Never",
            "command": ["python3", "/stand-in/identity_controller.py"],
            "env": [
                {"name": "POD_NAMESPACE", "valueFrom": namespace},
                # No kube-proxy on this node: the apiserver where it listens.
                {"name": "KUBERNETES_SERVICE_HOST", "value": HOST_IP},
                {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
            ],
            "volumeMounts": [
                {"name": "trust-roots", "mountPath": "/var/run/linkerd/identity/trust-roots"},
                {"name": "issuer", "mountPath": "/var/run/linkerd/identity/issuer"},
                {"name": "stand-in", "mountPath": "/stand-in"},
                {"name": "linkerd-check", "mountPath": "/opt/linkerd-check"},
            ],
        }
    )
    spec["volumes"] = [
        {"name": "trust-roots", "configMap": {"name": TRUST_ROOTS}},
        {"name": "issuer", "secret": {"secretName": ISSUER_SECRET}},
        {"name": "stand-in", "configMap": {"name": "identity-stand-in"}},
        {"name": "linkerd-check", "hostPath": {"path": checker, "type": "File"}},
    ]


def inject_app(kube: Kube, bundle: str) -> None:
    """(Re-)create the meshed workload's Pods as the injector would, holding ``bundle``."""
    annotations = {"linkerd.io/trust-root-sha256": bundle_hash(bundle)}
    kube.apply(_deployment(APP_NS, APP, {"value": bundle}, annotations))


def app_service(kube: Kube) -> None:
    """The Service Kong reaches the workload through (the daemon annotates it)."""
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": APP_NS, "name": APP},
            "spec": {"selector": {"app": APP}, "ports": [{"port": 8443}]},
        }
    )


def rolled_out(kube: Kube, namespace: str, name: str) -> bool:
    """The Deployment's latest template runs, Ready, and no older Pod is left."""
    live = kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    status = live.get("status") or {}
    replicas = live["spec"]["replicas"]
    return bool(
        status.get("observedGeneration") == live["metadata"]["generation"]
        and status.get("updatedReplicas") == replicas
        and status.get("readyReplicas") == replicas
        and status.get("replicas") == replicas
    )


def trust_bundle(kube: Kube) -> str:
    cm = kube.get(f"/api/v1/namespaces/{LINKERD_NS}/configmaps/{TRUST_ROOTS}")
    pem: str = cm["data"]["ca-bundle.crt"]
    return pem


# --- helm -----------------------------------------------------------------------------------


@dataclass
class Release:
    node: Node
    helm: Helm
    workdir: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        kubeconfig = str(self.node.kube.admin_kubeconfig)
        return self.helm.run(
            *args, "--kubeconfig", kubeconfig, "--namespace", NAMESPACE, check=False
        )

    def write_values(self, content: dict[str, Any], name: str) -> Path:
        path = self.workdir / name
        path.write_text(yaml.safe_dump(content, sort_keys=False))
        return path

    def install(self, values_file: Path) -> None:
        chart = str(ROOT / "charts" / "ca-daemon")
        result = self.run(
            "install", RELEASE, chart, "--create-namespace", "--values", str(values_file)
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def upgrade(self, values_file: Path) -> None:
        chart = str(ROOT / "charts" / "ca-daemon")
        result = self.run("upgrade", RELEASE, chart, "--values", str(values_file))
        assert result.returncode == 0, result.stdout + result.stderr

    def uninstall(self) -> None:
        result = self.run("uninstall", RELEASE, "--wait")
        assert result.returncode == 0, result.stdout + result.stderr

    def pods_detail(self) -> str:
        """Pod phases and each daemon Pod's log, for a failure message."""
        kube = self.node.kube
        lines = []
        for pod in daemon_pods(kube):
            name = pod["metadata"]["name"]
            statuses = pod.get("status", {}).get("containerStatuses") or []
            lines.append(f"{name}: {pod['status'].get('phase')} {statuses}")
            lines.append(self.node.pod_logs(NAMESPACE, name))
        return "\n".join(lines)


def wait_ready_pods(release: Release, count: int, timeout: float = 180) -> list[dict[str, Any]]:
    kube = release.node.kube
    wait_for(
        f"{count} daemon Pods Ready",
        lambda: (
            sum(is_ready(p) for p in daemon_pods(kube)) == count and len(daemon_pods(kube)) == count
        ),
        timeout,
        release.pods_detail,
    )
    return daemon_pods(kube)


def operator_token(kube: Kube, workdir: Path) -> Path:
    """An operator allowed to request rotations: bound to the chart's rotations role."""
    kube.create_service_account("default", "platform-operator")
    kube.bind_cluster_role(
        "platform-operator-rotates",
        f"ca-daemon:{NAMESPACE}:{RELEASE}:rotate",
        "default",
        "platform-operator",
    )
    return token_file(
        kube, "default", "platform-operator", workdir / "operator.token", expiration_seconds=7200
    )


def cli_env() -> dict[str, str]:
    """The CLI as an operator runs it on a workstation: none of the daemon's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CA_DAEMON_")}
    return env
