"""The least-privilege RBAC a configuration needs: one Role per namespace it writes to.

Names are pinned with resourceNames wherever Kubernetes allows it (``create`` and
``list`` cannot be pinned; Kong CA Secrets are named after root fingerprints, so
they need get/list/update/delete by label in the Kong namespace).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ca_daemon.config import Settings
from ca_daemon.publish.k8s_objects import split_service

ROLE_NAME = "ca-daemon"


def _rule(resource: str, verbs: list[str], names: list[str] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"apiGroups": [""], "resources": [resource], "verbs": verbs}
    if names:
        rule["resourceNames"] = sorted(set(names))
    return rule


def namespace_rules(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    secrets: dict[str, list[str]] = defaultdict(list)
    configmaps: dict[str, list[str]] = defaultdict(list)
    services: dict[str, list[str]] = defaultdict(list)
    kong_ca_namespace: str | None = None
    if settings.linkerd.enabled:
        ns = settings.linkerd.namespace
        secrets[ns].append(settings.linkerd.issuer_secret)
        configmaps[ns].append(settings.linkerd.trust_roots_configmap)
    kong = settings.kong
    if kong.enabled and kong.delivery == "kubernetes":
        kong_ca_namespace = kong.namespace
        for client in kong.clients:
            if client.service:
                ns, name = split_service(client.service, kong.namespace)
                services[ns].append(name)
            else:
                ns = kong.namespace
            secrets[ns].append(client.secret_name)
    for target in settings.bundles:
        configmaps[target.namespace].append(target.configmap)

    rules: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ns, names in secrets.items():
        rules[ns] += [_rule("secrets", ["get", "update"], names), _rule("secrets", ["create"])]
    for ns, names in configmaps.items():
        rules[ns] += [
            _rule("configmaps", ["get", "update"], names),
            _rule("configmaps", ["create"]),
        ]
    for ns, names in services.items():
        rules[ns].append(_rule("services", ["get", "patch"], names))
    if kong_ca_namespace is not None:
        rules[kong_ca_namespace].append(_rule("secrets", ["get", "list", "update", "delete"]))
        rules[kong_ca_namespace].append(_rule("secrets", ["create"]))
    for ns in rules:
        rules[ns].append(_rule("events", ["create"]))
    return dict(rules)


def manifests(settings: Settings, sa_namespace: str, sa_name: str) -> list[dict[str, Any]]:
    """Role + RoleBinding per namespace, bound to the daemon's ServiceAccount."""
    docs: list[dict[str, Any]] = []
    for ns, rules in sorted(namespace_rules(settings).items()):
        meta = {
            "name": ROLE_NAME,
            "namespace": ns,
            "labels": {"app.kubernetes.io/name": "ca-daemon"},
        }
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": meta,
                "rules": rules,
            }
        )
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": meta,
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": ROLE_NAME,
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}
                ],
            }
        )
    return docs
