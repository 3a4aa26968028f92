"""``ca-daemon verify`` against a live cluster: read what Linkerd and Kong read, check it.

Uses the same checks as the directory verifier, fed from the Secrets and ConfigMaps, and
the checks of Kong and Linkerd together (integration_checks) fed from Pods and Services.
The most common integration failure it looks for: Linkerd's roots and Kong's differ.

Reading is all that happens here. The trust bundle, the issuer and Kong's Secrets must be
readable (else verify fails, naming the call); Pods and Services are read as widely as
the credentials allow, and a check that could not be made is named in ``skipped``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from kubernetes import client

from ca_daemon.config.settings import Settings
from ca_daemon.errors import KubeError
from ca_daemon.pki.bundle import BundleError, fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import verify_ca_under_roots
from ca_daemon.publish.k8s_objects import (
    KONG_CA_LABEL,
    KONG_CLIENT_CERT,
    TLS_SECRET,
    split_service,
)
from ca_daemon.publish.pods_gate import CONTROL_PLANE_NS_LABEL
from ca_daemon.report import integration_checks as together
from ca_daemon.report.findings import Report
from ca_daemon.report.verify import (
    Thresholds,
    check_bundle,
    check_kong_cas,
    check_kong_client,
    check_linkerd_issuer,
)
from ca_daemon.util.kube import call

Obj = dict[str, Any]
_PAGE = 500


def _secret_data(secret: Obj) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _list(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Obj]:
    """Every item, a page at a time, as JSON."""
    items: list[Obj] = []
    token: str | None = None
    while True:
        page_kw = dict(kwargs, limit=_PAGE, **({"_continue": token} if token else {}))
        page = call(what, fn, *args, raw=True, **page_kw) or {}
        items += page.get("items") or []
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items


def verify_clusters(
    targets: Sequence[tuple[str, client.ApiClient, Settings]], now: datetime
) -> Report:
    """Every cluster checked on its own (findings named by cluster), then across them:
    Linkerd multicluster needs the very same roots in every linked cluster (`linkerd
    multicluster check` compares them as sets), so one that differs from the first is named."""
    report = Report()
    roots: dict[str, frozenset[str]] = {}
    for name, api, settings in targets:
        try:
            # Each cluster's own renewal windows (its issuer, its Kong clients).
            one = verify_cluster(api, settings, now, Thresholds.from_settings(settings))
            roots[name] = _bundle_fingerprints(api, settings)
        except KubeError as exc:
            report.add("cluster-unreadable", f"cluster {name}", f"cluster {name}: {exc}")
            continue
        report.extend(
            replace(f, object=f"{name}: {f.object}", message=f"cluster {name}: {f.message}")
            for f in one.findings
        )
        report.checked += [f"cluster {name}: {line}" for line in one.checked]
        report.skipped += [f"cluster {name}: {line}" for line in one.skipped]
    if len(roots) < 2:
        return report
    (first, expected), *others = roots.items()
    differ = [(name, found) for name, found in others if found != expected]
    for name, found in differ:
        report.add(
            "clusters-roots-differ",
            f"cluster {name}",
            f"cluster {name} trusts roots {_short(found)}, cluster {first} trusts "
            f"{_short(expected)}: linked clusters must hold the same roots",
        )
    if not differ:
        names = ", ".join(roots)
        report.checked.append(f"clusters {names} trust the same {len(expected)} root(s)")
    return report


def _short(fingerprints: frozenset[str]) -> str:
    return "{" + ", ".join(sorted(f[:16] for f in fingerprints)) + "}" if fingerprints else "{}"


def _bundle_fingerprints(api: client.ApiClient, settings: Settings) -> frozenset[str]:
    linkerd = settings.linkerd
    configmap = call(
        f"read ConfigMap {linkerd.namespace}/{linkerd.trust_roots_configmap}",
        client.CoreV1Api(api).read_namespaced_config_map,
        linkerd.trust_roots_configmap,
        linkerd.namespace,
        missing_ok=True,
        raw=True,
    )
    bundle = ((configmap or {}).get("data") or {}).get("ca-bundle.crt") or ""
    try:
        return frozenset(fingerprint(c) for c in parse_pem_certificates(bundle))
    except BundleError:
        return frozenset()  # verify_cluster already reported it


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
        raw=True,
    )
    bundle = ((configmap or {}).get("data") or {}).get("ca-bundle.crt")
    if bundle is None:
        report.add("bundle-missing", cm_name, f"{cm_name}: missing, or has no key ca-bundle.crt")
        return report
    bundle_bytes = bundle.encode()
    roots = check_bundle(cm_name, bundle_bytes, now, report, thresholds.root)

    if linkerd.enabled:
        _check_issuer(core, settings, bundle_bytes, roots, now, thresholds, report)

    kong = settings.kong
    kic = kong.enabled and kong.delivery == "kubernetes"
    kong_secrets = _check_kong(core, settings, roots, now, thresholds, report) if kic else {}
    _check_bundle_copies(core, settings, bundle, cm_name, report)
    services: list[Obj] | None = None  # Services matter with KIC only
    if kic:
        services = _services(core, settings, report)
        _check_kong_secrets(core, services, kong_secrets, report)
    if linkerd.enabled:
        _check_meshed_pods(core, settings, bundle, services, report)
    return report


def _check_bundle_copies(
    core: client.CoreV1Api, settings: Settings, bundle: str, cm_name: str, report: Report
) -> None:
    for target in settings.bundles:
        name = f"ConfigMap {target.namespace}/{target.configmap}"
        extra = call(
            f"read {name}",
            core.read_namespaced_config_map,
            target.configmap,
            target.namespace,
            missing_ok=True,
            raw=True,
        )
        value = ((extra or {}).get("data") or {}).get(target.key)
        if value != bundle:
            report.add(
                "bundle-copy-differs", name, f"{name}: key {target.key} differs from {cm_name}"
            )


def _check_kong(
    core: client.CoreV1Api,
    settings: Settings,
    roots: list[Any],
    now: datetime,
    thresholds: Thresholds,
    report: Report,
) -> dict[tuple[str, str], Obj | None]:
    """Kong's CA Secrets and client Secrets; returns what was read, by (namespace, name)."""
    kong = settings.kong
    listed = _list(
        f"list Kong CA Secrets in {kong.namespace}",
        core.list_namespaced_secret,
        kong.namespace,
        label_selector=f"{KONG_CA_LABEL}=true",
    )
    cas = {}
    for secret in listed:
        data = _secret_data(secret)
        cert = data.get("cert") or data.get("ca.crt")
        ident = data.get("id", b"").decode() or str(secret["metadata"].get("uid"))
        if cert is None:
            where = f"Secret {kong.namespace}/{_name(secret)}"
            report.add("kong-ca-invalid", where, f"Kong CA {where}: no key cert or ca.crt")
            continue
        cas[ident] = cert
    # Linkerd's roots vs Kong's: a root in one and not the other breaks a hop.
    check_kong_cas(cas, roots, report)
    report.extend(together.kong_ca_ingress_class(listed, kong.ingress_class))
    read: dict[tuple[str, str], Obj | None] = {(kong.namespace, _name(s)): s for s in listed}
    for c in kong.clients:
        client_ns = split_service(c.service, kong.namespace)[0] if c.service else kong.namespace
        name = f"Secret {client_ns}/{c.secret_name}"
        secret = call(
            f"read {name}",
            core.read_namespaced_secret,
            c.secret_name,
            client_ns,
            missing_ok=True,
            raw=True,
        )
        read[client_ns, c.secret_name] = secret
        if secret is None:
            report.add("client-missing", name, f"kong client {c.name}: {name} is missing")
            continue
        data = _secret_data(secret)
        if secret.get("type") != TLS_SECRET or "tls.crt" not in data or "tls.key" not in data:
            report.add(
                "client-invalid",
                name,
                f"kong client {c.name}: {name} must be type {TLS_SECRET} with tls.crt, tls.key",
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
            thresholds.intermediate,
        )
    return read


def _services(core: client.CoreV1Api, settings: Settings, report: Report) -> list[Obj]:
    """The Services of the namespaces where the configured clients' Services are: those
    Kong reaches with our client certificates, and their neighbours, which may name them
    too. A namespace whose Services may not be listed: the clients' own, read by name."""
    kong = settings.kong
    wanted: dict[str, list[str]] = {}
    for c in kong.clients:
        if c.service:
            namespace, name = split_service(c.service, kong.namespace)
            wanted.setdefault(namespace, []).append(name)
    found: list[Obj] = []
    for namespace, names in sorted(wanted.items()):
        try:
            found += _list(f"list Services in {namespace}", core.list_namespaced_service, namespace)
            continue
        except KubeError as exc:
            report.skipped.append(f"Services in {namespace} other than kong.clients' own: {exc}")
        for name in sorted(set(names)):
            try:
                service = call(
                    f"read Service {namespace}/{name}",
                    core.read_namespaced_service,
                    name,
                    namespace,
                    missing_ok=True,
                    raw=True,
                )
            except KubeError as exc:
                report.skipped.append(f"Service {namespace}/{name}: {exc}")
                continue
            if service is not None:
                found.append(service)
    return found


def _check_kong_secrets(
    core: client.CoreV1Api,
    services: list[Obj],
    kong_secrets: dict[tuple[str, str], Obj | None],
    report: Report,
) -> None:
    """Every Secret Kong reads (its CA and client Secrets, and those Services name for
    KIC) carries Kong's label; those Services name exist and are kubernetes.io/tls."""
    read = dict(kong_secrets)
    for service in services:
        name = together.annotations_of(service).get(KONG_CLIENT_CERT)
        key = (together.namespace_of(service), name or "")
        if not name or key in read:
            continue
        try:
            read[key] = call(
                f"read Secret {key[0]}/{key[1]}",
                core.read_namespaced_secret,
                key[1],
                key[0],
                missing_ok=True,
                raw=True,
            )
        except KubeError as exc:
            report.skipped.append(f"Secret {key[0]}/{key[1]} that a Service names: {exc}")
    report.extend(together.client_cert_secrets(services, read))
    report.extend(together.kong_secret_labels(s for s in read.values() if s is not None))
    named = sum(1 for s in services if together.annotations_of(s).get(KONG_CLIENT_CERT))
    report.checked.append(
        f"Kong's Secrets: {len(read)}; Services naming a client certificate: {named}"
    )


def _check_meshed_pods(
    core: client.CoreV1Api,
    settings: Settings,
    bundle: str,
    services: list[Obj] | None,
    report: Report,
) -> None:
    """The Pods this control plane meshed (its injector labels them, and linkerd check
    lists them so): their trust-root hash, and (``services``: with KIC) Kong's TLS
    through their proxies."""
    linkerd_ns, kong_ns = settings.linkerd.namespace, settings.kong.namespace
    selector = f"{CONTROL_PLANE_NS_LABEL}={linkerd_ns}"
    try:
        pods = _list("list meshed Pods", core.list_pod_for_all_namespaces, label_selector=selector)
    except KubeError as exc:
        report.skipped.append(f"meshed Pods (their trust roots, Kong's TLS through them): {exc}")
        return
    report.extend(together.stale_trust_roots(pods, bundle, linkerd_ns))
    report.checked.append(f"meshed Pods: {len(pods)}, against the bundle's sha256")
    if services is not None:
        report.extend(together.double_encryption(services, pods, kong_ns, linkerd_ns))
        kong = sum(1 for p in pods if together.namespace_of(p) == kong_ns)
        report.checked.append(f"Kong's TLS to meshed upstreams: {kong} meshed Pod(s) in {kong_ns}")


def _roots(pem: bytes, what: str, report: Report) -> list[Any]:
    try:
        return parse_pem_certificates(pem, what=what)
    except BundleError as exc:
        report.add("issuer-ca-mismatch", what, str(exc))
        return []


def _check_issuer(
    core: client.CoreV1Api,
    settings: Settings,
    bundle: bytes,
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
        raw=True,
    )
    if secret is None:
        report.add("issuer-missing", name, f"{name}: missing")
        return
    if secret.get("type") != TLS_SECRET:
        report.add(
            "issuer-wrong-type",
            name,
            f"{name}: type {secret.get('type')}; Linkerd's kubernetes.io/tls scheme needs "
            f"{TLS_SECRET}",
        )
        return
    data = _secret_data(secret)
    missing = sorted({"tls.crt", "tls.key", "ca.crt"} - set(data))
    if missing:
        report.add("issuer-missing", name, f"{name}: missing keys {', '.join(missing)}")
        return
    issuer = check_linkerd_issuer(
        data["tls.crt"], data["tls.key"], roots, now, report, rotate_before=thresholds.issuer
    )
    # linkerd check validates this scheme against the Secret's own ca.crt too.
    ca_roots = _roots(data["ca.crt"], f"{name} ca.crt", report)
    if issuer is not None:
        for p in verify_ca_under_roots(issuer, ca_roots, now):
            report.add("issuer-ca-mismatch", name, f"linkerd issuer vs {name} ca.crt: {p}")
    if {fingerprint(r) for r in ca_roots} != {fingerprint(r) for r in roots}:
        report.add(
            "issuer-ca-mismatch",
            name,
            f"{name} ca.crt and the trust-roots ConfigMap hold different roots",
        )
    elif data["ca.crt"] != bundle:
        # Same roots, other text: harmless to Linkerd, but not what the daemon publishes.
        report.add(
            "issuer-ca-mismatch",
            name,
            f"{name} ca.crt differs from the trust-roots ConfigMap's ca-bundle.crt (same roots)",
        )
