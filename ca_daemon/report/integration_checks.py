"""Kong and Linkerd checked together, over Pods, Services and Secrets as the API server
returns them (JSON, camelCase keys). Pure: objects in, findings out; verify_cluster reads.

- Kong's TLS to a meshed upstream must skip Linkerd's proxy on one side, or Linkerd's
  mTLS wraps it a second time (``double_encryption``).
- Kong's controllers read only the Secrets they filter for: the ``konghq.com/secret``
  label (Kong Operator), the ingress class on CA Secrets (KIC before 3.4), and a
  ``konghq.com/client-cert`` Secret of type ``kubernetes.io/tls`` in the Service's own
  namespace (``kong_secret_labels``, ``kong_ca_ingress_class``, ``client_cert_secrets``).
- Meshed Pods injected with another trust bundle than the published one
  (``stale_trust_roots``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ca_daemon.pki.bundle import bundle_hash
from ca_daemon.publish.k8s_objects import (
    INGRESS_CLASS,
    KONG_CLIENT_CERT,
    KONG_PROTOCOL,
    KONG_SECRET_LABEL,
    MANAGED_BY,
    MANAGER,
    TLS_SECRET,
)
from ca_daemon.publish.pods_gate import TRUST_ROOT_ANNOTATION, is_meshed
from ca_daemon.report.findings import Finding, finding

Obj = Mapping[str, Any]
PortRange = tuple[int, int]

# The protocols Kong speaks TLS to an upstream in: KIC's isNonTLSProtocol lists the others
# (internal/dataplane/translator/ingressrules.go).
TLS_PROTOCOLS = frozenset({"https", "grpcs", "tls", "wss"})
# KIC sends to the Service's own address, not to its endpoints, with this annotation
# (internal/dataplane/translator/translate_upstreams.go getEndpoints).
SERVICE_UPSTREAM = "ingress.kubernetes.io/service-upstream"
# linkerd2 pkg/k8s/labels.go
SKIP_OUTBOUND = "config.linkerd.io/skip-outbound-ports"
SKIP_INBOUND = "config.linkerd.io/skip-inbound-ports"
# The install-wide default, given to proxy-init (charts/partials/templates/_proxy-init.tpl).
PROXY_INIT = "linkerd-init"
OUTBOUND_IGNORE_FLAG = "--outbound-ports-to-ignore"

_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})  # no proxy of theirs runs again
_NUMBER = re.compile(r"[0-9]+")
_MAX_PORT = 65535


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta: Mapping[str, Any] = obj.get("metadata") or {}
    return meta


def annotations_of(obj: Obj) -> Mapping[str, str]:
    found: Mapping[str, str] = _meta(obj).get("annotations") or {}
    return found


def _labels(obj: Obj) -> Mapping[str, str]:
    found: Mapping[str, str] = _meta(obj).get("labels") or {}
    return found


def namespace_of(obj: Obj) -> str:
    return str(_meta(obj).get("namespace", ""))


def ref(obj: Obj) -> str:
    return f"{namespace_of(obj)}/{_meta(obj).get('name', '')}"


def port_ranges(value: str) -> list[PortRange]:
    """A Linkerd port list, as linkerd2 reads it (pkg/util/parsing.go GetPortRanges,
    pkg/util/portrange.go ParsePortRange): ports and inclusive ranges joined by commas,
    ``"25,4000-5000"``; one trailing comma dropped, each entry trimmed, an entry that is
    not a port or a range skipped (Linkerd logs it and goes on)."""
    ranges = []
    for entry in value.removesuffix(",").split(","):
        bounds = entry.strip().split("-")
        if len(bounds) > 2 or not all(_NUMBER.fullmatch(b) for b in bounds):
            continue
        lower, upper = int(bounds[0]), int(bounds[-1])
        if lower <= upper <= _MAX_PORT:
            ranges.append((lower, upper))
    return ranges


def covers(ranges: Iterable[PortRange], port: int) -> bool:
    return any(lower <= port <= upper for lower, upper in ranges)


def _flag(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.removeprefix(f"{flag}=")
    return None


def outbound_skipped(pod: Obj) -> list[PortRange]:
    """Ports the Pod sends past its proxy: the annotation (the injector copies a
    namespace's onto the Pod, controller/proxy-injector/webhook.go) and proxy-init's
    ``--outbound-ports-to-ignore`` (the install-wide default, or that annotation)."""
    ranges = port_ranges(annotations_of(pod).get(SKIP_OUTBOUND, ""))
    for container in (pod.get("spec") or {}).get("initContainers") or []:
        if container.get("name") == PROXY_INIT:
            value = _flag([str(a) for a in container.get("args") or []], OUTBOUND_IGNORE_FLAG)
            ranges += port_ranges(value or "")
    return ranges


def inbound_skipped(pod: Obj) -> list[PortRange]:
    """Ports the Pod takes past its proxy, as Linkerd's destination controller reads them
    when it tells a client's proxy how to reach the Pod: the annotation only
    (controller/api/destination/endpoint_translator.go, server.go)."""
    return port_ranges(annotations_of(pod).get(SKIP_INBOUND, ""))


def _meshed(pod: Obj, linkerd_namespace: str) -> bool:
    """A Linkerd proxy of this control plane runs in it (pods_gate.is_meshed)."""
    phase = (pod.get("status") or {}).get("phase")
    return phase not in _TERMINAL_PHASES and is_meshed(pod, linkerd_namespace)


def _selects(selector: Mapping[str, str], pod: Obj) -> bool:
    labels = _labels(pod)
    return all(labels.get(k) == v for k, v in selector.items())


def _target_port(port: Obj, pod: Obj) -> int | None:
    """The Pod's port a Service port leads to: targetPort, a number or a container port's
    name (unresolved: None), or the port itself when none is given."""
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int):
        return target
    for container in (pod.get("spec") or {}).get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == target:
                return int(declared["containerPort"])
    return None


def double_encryption(
    services: Iterable[Obj],
    pods: Sequence[Obj],
    kong_namespace: str,
    linkerd_namespace: str,
) -> list[Finding]:
    """Service ports that Kong reaches with TLS through Linkerd's proxies on both sides.

    Kong's proxy finds no HTTP in a TLS stream and forwards it as opaque TCP (ingress mode
    too: linkerd2-proxy linkerd/app/outbound/src/ingress.rs falls back from HTTP
    detection), and opaque TCP to a meshed Pod goes over Linkerd's mTLS: Kong's TLS inside
    Linkerd's. One skip on either side ends that: Kong's Pod sending the port past its
    proxy, or the upstream Pod taking it past its own, whereupon the destination
    controller gives Kong's proxy no identity to speak mTLS to (endpoint_translator.go).
    """
    kong = [p for p in pods if namespace_of(p) == kong_namespace and _meshed(p, linkerd_namespace)]
    if not kong:
        return []
    found = []
    for service in sorted(services, key=ref):
        annotations = annotations_of(service)
        protocol = annotations.get(KONG_PROTOCOL, "")
        secret = annotations.get(KONG_CLIENT_CERT)
        spec = service.get("spec") or {}
        selector = spec.get("selector") or {}
        if not secret or protocol not in TLS_PROTOCOLS or not selector:
            continue  # no selector: no Pods of its own to judge (ExternalName, own Endpoints)
        upstream = [
            p
            for p in pods
            if namespace_of(p) == namespace_of(service)
            and _selects(selector, p)
            and _meshed(p, linkerd_namespace)
        ]
        to_service = annotations.get(SERVICE_UPSTREAM) == "true"
        for port in spec.get("ports") or []:
            if port.get("protocol", "TCP") != "TCP":
                continue
            hops = _through_both_proxies(port, kong, upstream, to_service)
            if hops:
                found.append(_double(service, port["port"], protocol, secret, hops))
    return found


Hop = tuple[Obj, Obj, int, int]  # Kong Pod, upstream Pod, port Kong connects to, Pod's port


def _through_both_proxies(
    port: Obj, kong: Sequence[Obj], upstream: Sequence[Obj], to_service: bool
) -> list[Hop]:
    """Each Kong Pod and upstream Pod whose proxies both carry Kong's connection to
    ``port``: Kong connects to the Service's port with service-upstream, else to the Pod's."""
    hops = []
    for pod in upstream:
        target = _target_port(port, pod)
        if target is None or covers(inbound_skipped(pod), target):
            continue
        out = int(port["port"]) if to_service else target
        hops += [(k, pod, out, target) for k in kong if not covers(outbound_skipped(k), out)]
    return hops


def _double(service: Obj, port: int, protocol: str, secret: str, hops: list[Hop]) -> Finding:
    kong_pod, upstream_pod, out, into = hops[0]
    kongs = len({ref(h[0]) for h in hops})
    upstreams = len({ref(h[1]) for h in hops})
    return finding(
        "double-encryption",
        f"Service {ref(service)} port {port}",
        f"Service {ref(service)} port {port}: Kong's TLS to it (konghq.com/protocol: "
        f"{protocol}, client certificate {secret}) is encrypted twice, inside Linkerd's mTLS: "
        f"{kongs} meshed Kong Pod(s) such as {ref(kong_pod)} send port {out} through their "
        f"proxy and {upstreams} meshed upstream Pod(s) such as {ref(upstream_pod)} take port "
        f"{into} through theirs",
        f"add {out} to {SKIP_OUTBOUND} on Kong's Pods, or {into} to {SKIP_INBOUND} on the "
        f"Pods of Service {ref(service)}, then restart those Pods",
    )


def kong_secret_labels(secrets: Iterable[Obj]) -> list[Finding]:
    """Kong Operator reads only Secrets labelled ``konghq.com/secret: "true"``, even those
    a Service names (developer.konghq.com/operator/reference/secrets). Only the daemon's
    own Secrets are judged: KIC's default Secret selector is empty, so a user's Secret
    without the label works there, and whether Kong Operator runs is not known here."""
    return [
        finding(
            "kong-secret-unlabelled",
            f"Secret {ref(s)}",
            f'Secret {ref(s)}: no label {KONG_SECRET_LABEL}: "true", so Kong Operator '
            "does not read it",
        )
        for s in sorted(secrets, key=ref)
        if _labels(s).get(MANAGED_BY) == MANAGER and _labels(s).get(KONG_SECRET_LABEL) != "true"
    ]


def kong_ca_ingress_class(ca_secrets: Iterable[Obj], ingress_class: str) -> list[Finding]:
    found = []
    for secret in sorted(ca_secrets, key=ref):
        value = annotations_of(secret).get(INGRESS_CLASS)
        if value != ingress_class:
            has = "no annotation" if value is None else f"{INGRESS_CLASS}: {value}"
            found.append(
                finding(
                    "kong-ca-ingress-class",
                    f"Secret {ref(secret)}",
                    f"Kong CA Secret {ref(secret)}: {has}, not {INGRESS_CLASS}: "
                    f"{ingress_class} (kong.ingress_class), so KIC before 3.4 does not read it",
                )
            )
    return found


def client_cert_secrets(
    services: Iterable[Obj], secrets: Mapping[tuple[str, str], Obj | None]
) -> list[Finding]:
    """Every ``konghq.com/client-cert`` names a ``kubernetes.io/tls`` Secret in the
    Service's own namespace, the only place KIC looks (internal/dataplane/translator/
    ingressrules.go handleServiceClientCertificates). KIC itself reads tls.crt and tls.key
    whatever the type (translate_certs.go getCertFromSecret); the type is what guarantees
    them. ``secrets``: by (namespace, name), None when absent; a Secret that could not be
    read is left out, and not judged."""
    found = []
    for service in sorted(services, key=ref):
        name = annotations_of(service).get(KONG_CLIENT_CERT)
        key = (namespace_of(service), name or "")
        if not name or key not in secrets:
            continue
        secret = secrets[key]
        said = f"Service {ref(service)}: {KONG_CLIENT_CERT} names Secret {'/'.join(key)}"
        if secret is None:
            found.append(
                finding(
                    "client-cert-missing",
                    f"Service {ref(service)}",
                    f"{said}, which does not exist in the Service's namespace",
                )
            )
        elif secret.get("type") != TLS_SECRET:
            found.append(
                finding(
                    "client-cert-not-tls",
                    f"Secret {'/'.join(key)}",
                    f"{said}, of type {secret.get('type')}, not {TLS_SECRET}",
                )
            )
    return found


def stale_trust_roots(
    pods: Iterable[Obj], bundle_pem: str, linkerd_namespace: str
) -> list[Finding]:
    """Meshed Pods whose ``linkerd.io/trust-root-sha256`` is not the published bundle's.

    The injector sets it to the lowercase hex sha256 of the exact ``ca-bundle.crt`` bytes
    it read, untrimmed (linkerd2 pkg/inject/inject.go injectObjectMeta;
    controller/proxy-injector/webhook.go reads the file). The control plane is skipped, as
    ``linkerd check --proxy`` skips it: Helm hashes its own copy of the anchors there.
    Counted, with the oldest Pod named: it has waited for a restart the longest.
    """
    want = bundle_hash(bundle_pem)
    stale = [
        p
        for p in pods
        if namespace_of(p) != linkerd_namespace
        and _meshed(p, linkerd_namespace)
        and TRUST_ROOT_ANNOTATION in annotations_of(p)
        and annotations_of(p)[TRUST_ROOT_ANNOTATION] != want
    ]
    if not stale:
        return []
    oldest = min(stale, key=lambda p: (str(_meta(p).get("creationTimestamp", "")), ref(p)))
    return [
        finding(
            "stale-trust-root",
            f"Pod {ref(oldest)}",
            f"{len(stale)} meshed Pod(s) were injected with another trust bundle: their "
            f"{TRUST_ROOT_ANNOTATION} is not the sha256 of the published ca-bundle.crt "
            f"({want[:16]}); the oldest is Pod {ref(oldest)} (created "
            f"{_meta(oldest).get('creationTimestamp', '?')})",
        )
    ]
