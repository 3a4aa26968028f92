"""``ca-daemon verify`` against a live cluster: read what Linkerd and Kong read, check it.

Uses the same checks as the directory verifier, fed from the Secrets and ConfigMaps.
The most common integration failure it looks for: Linkerd's roots and Kong's differ.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from kubernetes import client

from ca_daemon.config.settings import Settings
from ca_daemon.pki.bundle import BundleError, fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import verify_ca_under_roots
from ca_daemon.publish.k8s_objects import KONG_CA_LABEL, TLS_SECRET, split_service
from ca_daemon.report.verify import (
    Report,
    Thresholds,
    check_bundle,
    check_kong_cas,
    check_kong_client,
    check_linkerd_issuer,
)
from ca_daemon.util.kube import call


def _secret_data(secret: Any) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def _roots(pem: bytes, what: str, report: Report) -> list[Any]:
    try:
        return parse_pem_certificates(pem, what=what)
    except BundleError as exc:
        report.problems.append(str(exc))
        return []


def verify_cluster(
    api: client.ApiClient, settings: Settings, now: datetime, thresholds: Thresholds
) -> Report:
    core = client.CoreV1Api(api)
    report = Report()
    linkerd = settings.linkerd
    ns = linkerd.namespace
    cm_name = f"ConfigMap {ns}/{linkerd.trust_roots_configmap}"
    configmap = call(
        f"read {cm_name}",
        core.read_namespaced_config_map,
        linkerd.trust_roots_configmap,
        ns,
        missing_ok=True,
    )
    bundle = ((configmap.data or {}) if configmap else {}).get("ca-bundle.crt")
    if bundle is None:
        report.problems.append(f"{cm_name}: missing, or has no key ca-bundle.crt")
        return report
    bundle_bytes = bundle.encode()
    roots = check_bundle(cm_name, bundle_bytes, now, report)

    if linkerd.enabled:
        _check_issuer(core, settings, roots, now, thresholds, report)

    kong = settings.kong
    if kong.enabled and kong.delivery == "kubernetes":
        listed = call(
            f"list Kong CA Secrets in {kong.namespace}",
            core.list_namespaced_secret,
            kong.namespace,
            label_selector=f"{KONG_CA_LABEL}=true",
        )
        cas = {}
        for secret in listed.items:
            data = _secret_data(secret)
            cert = data.get("cert") or data.get("ca.crt")
            ident = data.get("id", b"").decode() or secret.metadata.uid
            if cert is None:
                report.problems.append(f"Kong CA Secret {secret.metadata.name}: no key cert")
                continue
            cas[ident] = cert
        # Linkerd's roots vs Kong's: a root in one and not the other breaks a hop.
        check_kong_cas(cas, roots, report)
        for c in kong.clients:
            client_ns = split_service(c.service, kong.namespace)[0] if c.service else kong.namespace
            name = f"Secret {client_ns}/{c.secret_name}"
            secret = call(
                f"read {name}",
                core.read_namespaced_secret,
                c.secret_name,
                client_ns,
                missing_ok=True,
            )
            if secret is None:
                report.problems.append(f"kong client {c.name}: {name} is missing")
                continue
            data = _secret_data(secret)
            if secret.type != TLS_SECRET or "tls.crt" not in data or "tls.key" not in data:
                report.problems.append(
                    f"kong client {c.name}: {name} must be type {TLS_SECRET} with tls.crt, tls.key"
                )
                continue
            check_kong_client(
                c.name,
                data["tls.crt"],
                data["tls.key"],
                roots,
                now,
                report,
                thresholds.clients.get(c.name),
            )

    for target in settings.bundles:
        name = f"ConfigMap {target.namespace}/{target.configmap}"
        extra = call(
            f"read {name}",
            core.read_namespaced_config_map,
            target.configmap,
            target.namespace,
            missing_ok=True,
        )
        value = ((extra.data or {}) if extra else {}).get(target.key)
        if value != bundle:
            report.problems.append(f"{name}: key {target.key} differs from {cm_name}")
    return report


def _check_issuer(
    core: client.CoreV1Api,
    settings: Settings,
    roots: list[Any],
    now: datetime,
    thresholds: Thresholds,
    report: Report,
) -> None:
    linkerd = settings.linkerd
    name = f"Secret {linkerd.namespace}/{linkerd.issuer_secret}"
    secret = call(
        f"read {name}",
        core.read_namespaced_secret,
        linkerd.issuer_secret,
        linkerd.namespace,
        missing_ok=True,
    )
    if secret is None:
        report.problems.append(f"{name}: missing")
        return
    if secret.type != TLS_SECRET:
        report.problems.append(
            f"{name}: type {secret.type}; Linkerd's kubernetes.io/tls scheme needs {TLS_SECRET}"
        )
        return
    data = _secret_data(secret)
    missing = sorted({"tls.crt", "tls.key", "ca.crt"} - set(data))
    if missing:
        report.problems.append(f"{name}: missing keys {', '.join(missing)}")
        return
    issuer = check_linkerd_issuer(
        data["tls.crt"], data["tls.key"], roots, now, report, rotate_before=thresholds.issuer
    )
    # linkerd check validates this scheme against the Secret's own ca.crt too.
    ca_roots = _roots(data["ca.crt"], f"{name} ca.crt", report)
    if issuer is not None:
        report.problems += [
            f"linkerd issuer vs {name} ca.crt: {p}"
            for p in verify_ca_under_roots(issuer, ca_roots, now)
        ]
    if {fingerprint(r) for r in ca_roots} != {fingerprint(r) for r in roots}:
        report.problems.append(f"{name} ca.crt and the trust-roots ConfigMap hold different roots")
