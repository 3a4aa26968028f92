"""The least-privilege RBAC a configuration needs: one Role per namespace it writes to,
plus one ClusterRole when Linkerd's meshed Pods (which live anywhere) must be read.

Names are pinned with resourceNames wherever Kubernetes allows it (``create`` and
``list`` cannot be pinned; Kong CA Secrets are named after root fingerprints, so
they need get/list/update/delete by label in the Kong namespace, and so do the CA
reference ConfigMaps in each namespace with a ``verify_upstream`` client's Service:
ConfigMaps, not Secrets, so that the daemon never needs to read an application's
Secrets there; the workloads
``linkerd.restart`` rolls are found at run time, so their patch cannot be pinned).
A pass reads a namespace's Secrets, ConfigMaps or Services to annotate with one LIST
(Secrets and ConfigMaps by the ``managed-by`` label) when it holds LIST_FROM of them or
more, not one GET per object; ``list`` of that kind is granted there and only there
(one object is read by name with the pinned ``get``: one request either way).

Linkerd (see ca_daemon/publish/linkerd_rollout.py):
- list Pods cluster-wide (ClusterRole): the pods gate, which an emergency root rotation
  uses whatever ``gate`` says.
- ``restart: control-plane`` or ``all``: list and patch Deployments in the Linkerd namespace.
- ``restart: all`` or ``emergency_restart: all``: get and patch Deployments,
  StatefulSets and DaemonSets, and get ReplicaSets (a Deployment owns its Pods through
  one), cluster-wide. With the default ``emergency_restart: as-restart`` an emergency
  rolls what ``restart`` says, and the operator rolls the rest of the data plane.
- The pods gate's one Event is updated in place: get/patch of that Event name.

Leader election (on by default with Kubernetes publishing): get/update of the one Lease
``leader_election.lease`` and create (the first replica makes it), in the daemon's
namespace: ``leader_election.namespace``, else the ServiceAccount's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ca_daemon.config.settings import Settings
from ca_daemon.publish.k8s_objects import LIST_FROM, split_service
from ca_daemon.publish.pods_gate import issuer_event_name, pending_event_name

ROLE_NAME = "ca-daemon"
_RBAC = "rbac.authorization.k8s.io/v1"


def _rule(
    resource: str | list[str],
    verbs: list[str],
    names: list[str] | None = None,
    group: str = "",
) -> dict[str, Any]:
    resources = [resource] if isinstance(resource, str) else resource
    rule: dict[str, Any] = {"apiGroups": [group], "resources": resources, "verbs": verbs}
    if names:
        rule["resourceNames"] = sorted(set(names))
    return rule


def namespace_rules(
    settings: Settings, daemon_ns: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Rules by namespace; ``daemon_ns`` is where the daemon runs (its Lease)."""
    secrets: dict[str, list[str]] = defaultdict(list)
    configmaps: dict[str, list[str]] = defaultdict(list)
    services: dict[str, list[str]] = defaultdict(list)
    kong_ca_namespace: str | None = None
    verifying: set[str] = set()
    linkerd = settings.linkerd
    if linkerd.enabled:
        ns = linkerd.namespace
        secrets[ns].append(linkerd.issuer_secret)
        configmaps[ns].append(linkerd.trust_roots_configmap)
    kong = settings.kong
    if kong.enabled and kong.delivery == "kubernetes":
        kong_ca_namespace = kong.namespace
        for client in kong.clients:
            if client.service:
                ns, name = split_service(client.service, kong.namespace)
                services[ns].append(name)
                if client.verify_upstream:
                    verifying.add(ns)
            else:
                ns = kong.namespace
            secrets[ns].append(client.secret_name)
    for target in settings.bundles:
        configmaps[target.namespace].append(target.configmap)

    rules: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ns, names in secrets.items():
        listed = ["list"] if len(set(names)) >= LIST_FROM else []
        rules[ns] += [
            _rule("secrets", ["get", "update"], names),
            _rule("secrets", ["create", *listed]),
        ]
    for ns, names in configmaps.items():
        listed = ["list"] if len(set(names)) >= LIST_FROM else []
        rules[ns] += [
            _rule("configmaps", ["get", "update"], names),
            _rule("configmaps", ["create", *listed]),
        ]
    for ns, names in services.items():
        rules[ns].append(_rule("services", ["get", "patch"], names))
        if len(set(names)) >= LIST_FROM:
            rules[ns].append(_rule("services", ["list"]))
    if kong_ca_namespace is not None:
        rules[kong_ca_namespace].append(_rule("secrets", ["get", "list", "update", "delete"]))
        rules[kong_ca_namespace].append(_rule("secrets", ["create"]))
    for ns in sorted(verifying):
        rules[ns].append(_rule("configmaps", ["get", "list", "update", "delete"]))
        rules[ns].append(_rule("configmaps", ["create"]))
    if linkerd.enabled and (linkerd.restart != "none" or rolls_all(settings)):
        # The control plane's Deployments: their names vary with extensions, so unpinned.
        rules[linkerd.namespace].append(_rule("deployments", ["list", "patch"], group="apps"))
    if linkerd.enabled:  # the pods gate, which an emergency uses whatever gate says
        event = pending_event_name(linkerd.trust_roots_configmap)
        rules[linkerd.namespace].append(_rule("events", ["get", "patch"], [event]))
    if linkerd.enabled and linkerd.confirm == "events":
        # Linkerd's identity controller answers with Events on its Deployment; an identity
        # Pod started after the issuer loaded it without one. And our own Warning Event.
        rules[linkerd.namespace] += [
            _rule("events", ["list"]),
            _rule("pods", ["list"]),
            _rule("events", ["get", "patch"], [issuer_event_name(linkerd.issuer_secret)]),
        ]
    if daemon_ns is not None and settings.leader_election_enabled:
        lease = settings.leader_election.lease
        group = "coordination.k8s.io"
        rules[daemon_ns].append(_rule("leases", ["get", "update"], [lease], group=group))
        rules[daemon_ns].append(_rule("leases", ["create"], group=group))
    for ns in rules:
        rules[ns].append(_rule("events", ["create"]))
    return dict(rules)


def cluster_rules(settings: Settings) -> list[dict[str, Any]]:
    """What cannot be namespaced: meshed Pods and the workloads owning them are anywhere,
    and the API's Kubernetes authentication asks the cluster-scoped review APIs."""
    linkerd = settings.linkerd
    rules: list[dict[str, Any]] = []
    if settings.server.auth == "kubernetes":
        # What system:auth-delegator grants, and nothing else.
        rules.append(_rule("tokenreviews", ["create"], group="authentication.k8s.io"))
        rules.append(_rule("subjectaccessreviews", ["create"], group="authorization.k8s.io"))
    if not linkerd.enabled:
        return rules
    rules.append(_rule("pods", ["list"]))  # the pods gate, which an emergency always uses
    if rolls_all(settings):
        rules.append(_rule("replicasets", ["get"], group="apps"))
        workloads = ["deployments", "statefulsets", "daemonsets"]
        rules.append(_rule(workloads, ["get", "patch"], group="apps"))
    return rules


def rolls_all(settings: Settings) -> bool:
    """Whether the daemon may roll meshed workloads anywhere: always (restart: all), or in
    an emergency (emergency_restart: all)."""
    linkerd = settings.linkerd
    return linkerd.restart == "all" or linkerd.emergency_restart == "all"


def cluster_role_name(sa_namespace: str, sa_name: str) -> str:
    """ClusterRoles share one cluster-wide namespace: name it after the ServiceAccount."""
    return f"{ROLE_NAME}:{sa_namespace}:{sa_name}"


def manifests(settings: Settings, sa_namespace: str, sa_name: str) -> list[dict[str, Any]]:
    """Role + RoleBinding per namespace, and a ClusterRole + ClusterRoleBinding when
    needed, bound to the daemon's ServiceAccount."""
    docs: list[dict[str, Any]] = []
    labels = {"app.kubernetes.io/name": "ca-daemon"}
    subjects = [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}]
    daemon_ns = settings.leader_election.namespace or sa_namespace
    for ns, rules in sorted(namespace_rules(settings, daemon_ns).items()):
        meta = {"name": ROLE_NAME, "namespace": ns, "labels": labels}
        docs.append(
            {
                "apiVersion": _RBAC,
                "kind": "Role",
                "metadata": meta,
                "rules": rules,
            }
        )
        docs.append(
            {
                "apiVersion": _RBAC,
                "kind": "RoleBinding",
                "metadata": meta,
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": ROLE_NAME,
                },
                "subjects": subjects,
            }
        )
    cluster = cluster_rules(settings)
    if cluster:
        meta = {"name": cluster_role_name(sa_namespace, sa_name), "labels": labels}
        docs.append(
            {"apiVersion": _RBAC, "kind": "ClusterRole", "metadata": meta, "rules": cluster}
        )
        docs.append(
            {
                "apiVersion": _RBAC,
                "kind": "ClusterRoleBinding",
                "metadata": meta,
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": meta["name"],
                },
                "subjects": subjects,
            }
        )
    return docs
