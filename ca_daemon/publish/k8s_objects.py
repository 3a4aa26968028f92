"""The Kubernetes objects a trust world becomes. Pure: names, types, keys, labels.

Linkerd (scheme ``kubernetes.io/tls``) reads the issuer Secret and the trust-roots
ConfigMap in its namespace. The Kong Ingress Controller reads a client-cert Secret
only from the Service's own namespace and keys the Kong Certificate on the Secret's
UID, so that Secret is always updated in place. Kong CA certificates are Secrets
labelled ``konghq.com/ca-cert: "true"`` holding one PEM and a stable ``id``.

A client with ``verify_upstream`` has its Service name CA certificates, which KIC looks
up only in the Service's own namespace and of which it reads only the ``id``
(internal/dataplane/translator/ingressrules.go, handleServiceCACertificates). Each root
has exactly one Kong CA entity, made from its Secret in ``kong.namespace``: KIC turns
every object labelled ``konghq.com/ca-cert`` into one (translate_cacerts.go), and Kong
refuses a whole configuration holding two with one id or one certificate (cert_digest
is unique). So what the Service names in its namespace is a reference, never a second
entity: a ConfigMap per root holding only that root's entity ``id``, without the
``ca-cert`` label.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509

from ca_daemon.config.names import kong_ca_object_name
from ca_daemon.config.settings import KongClient, Settings
from ca_daemon.model.generation import UNKNOWN, Generation, generation_of
from ca_daemon.model.world import TrustWorld, published_before
from ca_daemon.pki.bundle import bundle_hash, fingerprint, render_pem, stable_id
from ca_daemon.pki.crl import CRL_FILE

# A namespace with this many objects of one kind to publish is read with one LIST (and the
# RBAC that `config rbac` prints grants `list` there).
LIST_FROM = 2
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "ca-daemon"
ROLE = "ca-daemon.io/role"
FINGERPRINT = "ca-daemon.io/fingerprint-sha256"
NOT_AFTER = "ca-daemon.io/not-after"
# Hash of the data the daemon wrote: lets any later reader (even after a restart) see
# that someone else changed the data since.
CONTENT = "ca-daemon.io/content-sha256"
# "<epoch>.<CA record version>.<credential revision>" the object was derived from
# (ca_daemon/model/generation.py): a writer holding an older journal view (a deposed
# leader) must not overwrite it.
GENERATION = "ca-daemon.io/generation"

TLS_SECRET = "kubernetes.io/tls"
OPAQUE_SECRET = "Opaque"
KONG_CA_LABEL = "konghq.com/ca-cert"
# Kong Operator and newer KIC watch only Secrets so labelled, even when referenced
# (developer.konghq.com/operator/reference/secrets).
KONG_SECRET_LABEL = "konghq.com/secret"
# KIC ingests only ConfigMaps so labelled (its --configmap-label-selector default,
# internal/controllers/configuration/configmap_controller.go), unless referenced by a
# BackendTLSPolicy: a Service annotation does not count.
KONG_CONFIGMAP_LABEL = "konghq.com/configmap"
KONG_CLIENT_CERT = "konghq.com/client-cert"
KONG_PROTOCOL = "konghq.com/protocol"
KONG_CA_CONFIGMAPS = "konghq.com/ca-certificates-configmaps"
KONG_TLS_VERIFY = "konghq.com/tls-verify"
INGRESS_CLASS = "kubernetes.io/ingress.class"


class Role:
    LINKERD_ISSUER = "linkerd-issuer"
    LINKERD_TRUST_ROOTS = "linkerd-trust-roots"
    KONG_CLIENT = "kong-client"
    KONG_CA = "kong-ca"
    KONG_CA_REF = "kong-ca-ref"
    BUNDLE = "trust-bundle"


@dataclass(frozen=True)
class DesiredObject:
    kind: str  # "Secret" | "ConfigMap"
    namespace: str
    name: str
    role: str
    data: Mapping[str, str]
    type: str | None = None  # Secrets only
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    generation: Generation = UNKNOWN
    # The journal says a full publish already carried this object: missing now, it was
    # deleted (drift), whichever replica published it.
    published: bool = False

    @property
    def ref(self) -> str:
        return f"{self.kind.lower()}/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePatch:
    """Annotations a Kong client's Service must carry; other annotations are left alone."""

    namespace: str
    name: str
    annotations: Mapping[str, str]
    # verify_upstream: the CA references of every trusted root, oldest first; the Service
    # is to name them (see trust_annotations). Empty: the client does not verify.
    trust: tuple[str, ...] = ()
    generation: Generation = UNKNOWN  # of the CA part of the world, for ``trust``

    @property
    def ref(self) -> str:
        return f"service/{self.namespace}/{self.name}"


def content_hash(data: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _object(
    kind: str,
    namespace: str,
    name: str,
    role: str,
    data: Mapping[str, str],
    identity: tuple[str, datetime],
    type_: str | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    generation: Generation = UNKNOWN,
    published: bool = False,
) -> DesiredObject:
    sha, not_after = identity
    return DesiredObject(
        generation=generation,
        published=published,
        kind=kind,
        namespace=namespace,
        name=name,
        role=role,
        data=data,
        type=type_,
        labels={MANAGED_BY: MANAGER, ROLE: role, **(labels or {})},
        annotations={
            FINGERPRINT: sha,
            NOT_AFTER: _iso(not_after),
            CONTENT: content_hash(data),
            **(annotations or {}),
        },
    )


def _cert_identity(cert: x509.Certificate) -> tuple[str, datetime]:
    return fingerprint(cert), cert.not_valid_after_utc


def kong_ca_secret_name(root: x509.Certificate) -> str:
    """The Kong CA Secret of ``root``, and the name of its CA references too."""
    return kong_ca_object_name(fingerprint(root))


def split_service(service: str, default_namespace: str) -> tuple[str, str]:
    namespace, _, name = service.rpartition("/")
    return namespace or default_namespace, name


def _client_namespace(client: KongClient, kong_namespace: str) -> str:
    return split_service(client.service, kong_namespace)[0] if client.service else kong_namespace


def verifying_namespaces(world: TrustWorld, settings: Settings) -> list[str]:
    """The namespaces whose Services are told to verify their upstream (KIC delivery)."""
    kong = settings.kong
    if not (kong.enabled and kong.delivery == "kubernetes"):
        return []
    found = {
        _client_namespace(c, kong.namespace)
        for c in kong.clients
        if c.verify_upstream and c.service and c.name in world.kong_clients
    }
    return sorted(found)


def desired_objects(world: TrustWorld, settings: Settings) -> list[DesiredObject]:
    bundle = world.bundle_pem
    # A bundle's identity is its hash (as Linkerd's linkerd.io/trust-root-sha256) and
    # the earliest end among its roots.
    bundle_identity = (
        bundle_hash(bundle),
        min(r.not_valid_after_utc for r in world.roots),
    )
    objects: list[DesiredObject] = []
    linkerd = settings.linkerd
    ca_only = generation_of(world)
    ca_published = published_before(world, None)
    if world.linkerd_issuer is not None:
        issuer = world.linkerd_issuer
        objects.append(
            _object(
                "Secret",
                linkerd.namespace,
                linkerd.issuer_secret,
                Role.LINKERD_ISSUER,
                {
                    "tls.crt": render_pem([issuer.cert]),
                    "tls.key": issuer.key_pem.decode(),
                    "ca.crt": bundle,
                },
                _cert_identity(issuer.cert),
                type_=TLS_SECRET,
                generation=generation_of(world, "linkerd-issuer"),
                published=published_before(world, issuer),
            )
        )
    if settings.linkerd.enabled:
        objects.append(
            _object(
                "ConfigMap",
                linkerd.namespace,
                linkerd.trust_roots_configmap,
                Role.LINKERD_TRUST_ROOTS,
                {"ca-bundle.crt": bundle},
                bundle_identity,
                generation=ca_only,
                published=ca_published,
            )
        )
    kong = settings.kong
    if kong.enabled and kong.delivery == "kubernetes":
        for client in kong.clients:
            entry = world.kong_clients.get(client.name)
            if entry is None:
                continue
            namespace = _client_namespace(client, kong.namespace)
            objects.append(
                _object(
                    "Secret",
                    namespace,
                    client.secret_name,
                    Role.KONG_CLIENT,
                    {
                        "tls.crt": render_pem([entry.cert, *entry.chain]),
                        "tls.key": entry.key_pem.decode(),
                    },
                    _cert_identity(entry.cert),
                    type_=TLS_SECRET,
                    labels={KONG_SECRET_LABEL: "true"},
                    generation=generation_of(world, f"kong/{client.name}"),
                    published=published_before(world, entry),
                )
            )
        for root in world.roots:
            objects.append(
                _object(
                    "Secret",
                    kong.namespace,
                    kong_ca_secret_name(root),
                    Role.KONG_CA,
                    {"cert": render_pem([root]), "id": stable_id(root)},
                    _cert_identity(root),
                    type_=OPAQUE_SECRET,
                    labels={KONG_CA_LABEL: "true", KONG_SECRET_LABEL: "true"},
                    annotations={INGRESS_CLASS: kong.ingress_class},
                    generation=ca_only,
                    published=ca_published,
                )
            )
        # One reference per root in each namespace that verifies: clients there share it.
        for namespace in verifying_namespaces(world, settings):
            for root in world.roots:
                objects.append(
                    _object(
                        "ConfigMap",
                        namespace,
                        kong_ca_secret_name(root),
                        Role.KONG_CA_REF,
                        {"id": stable_id(root)},
                        _cert_identity(root),
                        labels={KONG_CONFIGMAP_LABEL: "true"},
                        generation=ca_only,
                        published=ca_published,
                    )
                )
    for target in settings.bundles:
        # The CRLs go beside the bundle once something was revoked (nginx's ssl_crl).
        crls = {CRL_FILE: world.crls_pem} if world.crls_pem is not None else {}
        objects.append(
            _object(
                "ConfigMap",
                target.namespace,
                target.configmap,
                Role.BUNDLE,
                {target.key: bundle, **crls},
                bundle_identity,
                generation=ca_only,
                published=ca_published,
            )
        )
    return objects


def desired_service_patches(world: TrustWorld, settings: Settings) -> list[ServicePatch]:
    kong = settings.kong
    if not (kong.enabled and kong.delivery == "kubernetes"):
        return []
    trust = tuple(kong_ca_secret_name(root) for root in world.roots)
    patches = []
    for client in kong.clients:
        if client.service and client.name in world.kong_clients:
            namespace, name = split_service(client.service, kong.namespace)
            patches.append(
                ServicePatch(
                    namespace,
                    name,
                    {KONG_CLIENT_CERT: client.secret_name, KONG_PROTOCOL: "https"},
                    trust=trust if client.verify_upstream else (),
                    generation=generation_of(world),
                )
            )
    return patches


def named_cas(annotations: Mapping[str, str] | None) -> list[str]:
    """The CA ConfigMaps a Service names, as KIC splits the annotation."""
    value = (annotations or {}).get(KONG_CA_CONFIGMAPS, "")
    return [part.strip() for part in value.split(",") if part.strip()]


def trust_annotations(
    trust: Sequence[str], live: Mapping[str, str] | None, ready: Collection[str]
) -> dict[str, str]:
    """What a verifying Service's trust annotations must be, given what it has now.

    Kong builds a Service's CA store from every id it lists and uses none of them if
    one is missing (kong/runloop/certificate.lua, fetch_ca_certificates); the Service
    then verifies against Kong's default store and its upstream fails. So a root is
    named only once its Kong CA Secret and its reference here were ``ready`` (already in
    place when this pass began: KIC has had a sync to see them), a root it names already
    stays while trusted, and a retired root goes. Nothing ready and nothing named: no
    annotation yet, since tls-verify without a CA would verify against the default store.
    """
    named = set(named_cas(live))
    names = [n for n in trust if n in ready or n in named]
    if not names:
        return {}
    return {KONG_CA_CONFIGMAPS: ",".join(names), KONG_TLS_VERIFY: "true"}


def warning_event(
    metadata: Mapping[str, str],
    involved: Mapping[str, str],
    reason: str,
    message: str,
    now: datetime,
    instance: str,
) -> dict[str, Any]:
    """A core/v1 Warning Event from the daemon about ``involved``; ``metadata`` holds its
    namespace and a fixed ``name`` or a ``generateName``."""
    stamp = _iso(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": dict(metadata),
        "involvedObject": dict(involved),
        "reason": reason,
        "message": message,
        "type": "Warning",
        "source": {"component": MANAGER},
        "reportingComponent": MANAGER,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
