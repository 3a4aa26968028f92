"""What must change now: a pure function of (state, now, settings).

``plan`` lists every step still needed, in the order they must run; the engine
carries out the first, saves the state and asks again, so each step is decided
on fresh facts and a crash resumes at the right place.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509.oid import NameOID

from ca_daemon.config import KongClient, Settings
from ca_daemon.pki.bundle import fingerprint
from ca_daemon.pki.profiles import Subject, subject_alt_names
from ca_daemon.rotation.state import State


@dataclass(frozen=True)
class CreateRoot:
    ref: str
    reason: str


@dataclass(frozen=True)
class IssueKongIntermediate:
    ref: str
    reason: str


@dataclass(frozen=True)
class IssueLinkerdIssuer:
    reason: str


@dataclass(frozen=True)
class IssueKongClient:
    name: str
    reason: str


@dataclass(frozen=True)
class DropKongClient:
    name: str
    reason: str


Step = CreateRoot | IssueKongIntermediate | IssueLinkerdIssuer | IssueKongClient | DropKongClient

# Targets a manual rotation may force (besides "kong/<name>" for one client).
LINKERD_ISSUER = "linkerd-issuer"
KONG_INTERMEDIATE = "kong-intermediate"


def client_target(name: str) -> str:
    return f"kong/{name}"


def renew_at(cert: x509.Certificate, rotate_before: timedelta, jitter: float) -> datetime:
    """When ``cert`` is due: ``rotate_before`` ahead of expiry, stretched by up to ``jitter``.

    The stretch comes from the certificate's fingerprint, so it is stable across runs and
    replicas while still spreading many certificates' renewals apart.
    """
    spread = int(fingerprint(cert)[:8], 16) / 0xFFFFFFFF
    return cert.not_valid_after_utc - rotate_before * (1 + jitter * spread)


def _due_reason(
    cert: x509.Certificate,
    now: datetime,
    rotate_before: timedelta,
    jitter: float,
    signer_not_after: datetime,
) -> str | None:
    if now < renew_at(cert, rotate_before, jitter):
        return None
    # Capped at the signer's end already: a new one would end no later, so renewing
    # would only churn. The signer's own rotation moves it on.
    if cert.not_valid_after_utc >= signer_not_after:
        return None
    left = cert.not_valid_after_utc - now
    return "expired" if left <= timedelta(0) else f"due: {_short(left)} left"


def _short(delta: timedelta) -> str:
    hours = int(delta.total_seconds() // 3600)
    return f"{hours}h" if hours else f"{int(delta.total_seconds() // 60)}m"


def client_subject(client: KongClient) -> Subject:
    """SANs for a Kong client; the common name is added as a DNS name, as Vault does by
    default, because TLS verifiers (webpki, cryptography) require a SAN on a leaf."""
    dns = list(client.dns_names)
    if client.common_name not in dns and _looks_like_hostname(client.common_name):
        dns.append(client.common_name)
    return Subject(client.common_name, tuple(dns), tuple(client.uris))


def _looks_like_hostname(name: str) -> bool:
    labels = name.split(".")
    return all(label and label.replace("-", "").isalnum() for label in labels)


def _same_subject(cert: x509.Certificate, want: Subject) -> bool:
    have = subject_alt_names(cert)
    return (
        have.common_name == want.common_name
        and sorted(have.dns_names) == sorted(want.dns_names)
        and sorted(have.uris) == sorted(want.uris)
    )


def plan(
    state: State,
    now: datetime,
    settings: Settings,
    force: Collection[str] = (),
) -> list[Step]:
    """Every step needed to bring ``state`` up to date at ``now``, in order."""
    steps: list[Step] = []
    jitter = settings.rotation.jitter
    root = state.active_root
    serial = state.serial
    if root is None:
        serial += 1
        steps.append(CreateRoot(ref=f"root-{serial}", reason="no trust anchor yet"))
        root_ref, root_not_after = f"root-{serial}", None
    else:
        root_ref, root_not_after = root.ref, root.cert.not_valid_after_utc

    def reason_for(
        entry_cert: x509.Certificate | None,
        signer_ref: str | None,
        want_signer: str | None,
        signer_not_after: datetime | None,
        rotate_before: timedelta,
        target: str,
    ) -> str | None:
        if entry_cert is None:
            return "missing"
        if target in force:
            return "manual rotation"
        if signer_ref != want_signer:
            return f"signed by {signer_ref}, not {want_signer}"
        if signer_not_after is None:
            return None
        return _due_reason(entry_cert, now, rotate_before, jitter, signer_not_after)

    if settings.linkerd.enabled:
        issuer = state.linkerd_issuer
        reason = reason_for(
            issuer.cert if issuer else None,
            issuer.signer_ref if issuer else None,
            root_ref,
            root_not_after,
            settings.linkerd.issuer.rotate_before,
            LINKERD_ISSUER,
        )
        if reason is None and issuer and issuer.cert.subject != _cn_name(settings):
            reason = "common name changed"
        if reason:
            steps.append(IssueLinkerdIssuer(reason=reason))

    if not settings.kong.enabled:
        return steps

    inter = state.kong_intermediate
    reason = reason_for(
        inter.cert if inter else None,
        inter.root_ref if inter else None,
        root_ref,
        root_not_after,
        settings.kong.intermediate.rotate_before,
        KONG_INTERMEDIATE,
    )
    if reason:
        serial += 1
        inter_ref, inter_not_after = f"kong-{serial}", None
        steps.append(IssueKongIntermediate(ref=inter_ref, reason=reason))
    else:
        assert inter is not None
        inter_ref, inter_not_after = inter.ref, inter.cert.not_valid_after_utc

    configured = {c.name: c for c in settings.kong.clients}
    for name, client in configured.items():
        entry = state.kong_clients.get(name)
        reason = reason_for(
            entry.cert if entry else None,
            entry.signer_ref if entry else None,
            inter_ref,
            inter_not_after,
            client.rotate_before,
            client_target(name),
        )
        if reason is None and entry and not _same_subject(entry.cert, client_subject(client)):
            reason = "subject changed in configuration"
        if reason:
            steps.append(IssueKongClient(name=name, reason=reason))
    for name in sorted(set(state.kong_clients) - set(configured)):
        steps.append(DropKongClient(name=name, reason="no longer configured"))
    return steps


def _cn_name(settings: Settings) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, settings.linkerd_issuer_common_name)])
