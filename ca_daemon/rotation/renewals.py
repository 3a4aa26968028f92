"""Issuing one credential: a fresh key, a CSR, the anchor's signature, the profile checked."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from ca_daemon.anchor.base import CA, Anchor
from ca_daemon.config.settings import KongClient, Settings
from ca_daemon.model.state import IssuedEntry, State, client_key, issuer_key
from ca_daemon.pki.keys import generate_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, Validity, build_csr, capped_validity
from ca_daemon.rotation.ca_steps import IssuanceError, require
from ca_daemon.rotation.plan import client_subject
from ca_daemon.rotation.steps import CredentialStep, IssueKongClient, IssueLinkerdIssuer


def credential_key(step: CredentialStep) -> str:
    """The journal's key of the credential a step makes or drops."""
    if isinstance(step, IssueLinkerdIssuer):
        return issuer_key(step.cluster)
    return client_key(step.name)


@dataclass(frozen=True)
class Order:
    """What a credential is issued as."""

    kind: Kind
    signer: CA
    subject: Subject
    validity: Validity
    chain: tuple[x509.Certificate, ...]  # what follows the certificate in tls.crt


def order(
    step: IssueLinkerdIssuer | IssueKongClient,
    state: State,
    now: datetime,
    settings: Settings,
    clients: Mapping[str, KongClient],
) -> Order:
    s = settings
    skew = s.rotation.clock_skew
    if isinstance(step, IssueLinkerdIssuer):
        root = state.ca.active_root
        if root is None:
            raise IssuanceError("no active trust anchor")
        linkerd = s.linkerd_of(step.cluster)
        validity = capped_validity(
            now, linkerd.issuer.lifetime, root.cert.not_valid_after_utc, skew
        )
        subject = Subject(s.issuer_common_name(step.cluster))
        return Order(Kind.LINKERD_ISSUER, CA(root.ref, root.cert), subject, validity, ())
    inter = state.ca.active_intermediate
    if inter is None:
        raise IssuanceError("no Kong intermediate to sign with")
    client = clients[step.name]
    validity = capped_validity(now, client.lifetime, inter.cert.not_valid_after_utc, skew)
    signer = CA(inter.ref, inter.cert)
    return Order(Kind.KONG_CLIENT, signer, client_subject(client), validity, (inter.cert,))


def issue(
    step: IssueLinkerdIssuer | IssueKongClient,
    state: State,
    now: datetime,
    anchor: Anchor,
    settings: Settings,
    clients: Mapping[str, KongClient],
) -> IssuedEntry:
    """The new credential (key kept in the entry, sealed only when journaled)."""
    wanted = order(step, state, now, settings, clients)
    key = generate_key("ec-p256")
    csr = build_csr(key, wanted.subject)
    sign = anchor.sign_ca if wanted.kind is Kind.LINKERD_ISSUER else anchor.sign_client
    cert = sign(wanted.signer, csr, wanted.subject, wanted.validity)
    require(wanted.kind, cert, wanted.signer.cert, anchor)
    return IssuedEntry(cert, private_key_pem(key), wanted.signer.ref, wanted.chain, now)


# The signature of issue(): the forecast swaps in a cheaper one (report/simulated.py).
Issue = Callable[
    [
        IssueLinkerdIssuer | IssueKongClient,
        State,
        datetime,
        Anchor,
        Settings,
        Mapping[str, KongClient],
    ],
    IssuedEntry,
]
