"""Issuing one credential: a fresh key, a CSR, the anchor's signature, the profile checked."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from ca_daemon.anchor.base import CA, Anchor
from ca_daemon.config.settings import KongClient, Settings
from ca_daemon.model.state import LINKERD_ISSUER, IssuedEntry, State, client_key
from ca_daemon.pki.keys import generate_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, build_csr, capped_validity
from ca_daemon.rotation.ca_steps import IssuanceError, require
from ca_daemon.rotation.plan import client_subject
from ca_daemon.rotation.steps import CredentialStep, IssueKongClient, IssueLinkerdIssuer


def credential_key(step: CredentialStep) -> str:
    """The journal's key of the credential a step makes or drops."""
    if isinstance(step, IssueLinkerdIssuer):
        return LINKERD_ISSUER
    return client_key(step.name)


def issue(
    step: IssueLinkerdIssuer | IssueKongClient,
    state: State,
    now: datetime,
    anchor: Anchor,
    settings: Settings,
    clients: Mapping[str, KongClient],
) -> IssuedEntry:
    """The new credential (key kept in the entry, sealed only when journaled)."""
    s = settings
    skew = s.rotation.clock_skew
    key = generate_key("ec-p256")
    if isinstance(step, IssueLinkerdIssuer):
        root = state.ca.active_root
        if root is None:
            raise IssuanceError("no active trust anchor")
        validity = capped_validity(
            now, s.linkerd.issuer.lifetime, root.cert.not_valid_after_utc, skew
        )
        subject = Subject(s.linkerd_issuer_common_name)
        cert = anchor.sign_ca(CA(root.ref, root.cert), build_csr(key, subject), subject, validity)
        require(Kind.LINKERD_ISSUER, cert, root.cert, anchor)
        return IssuedEntry(cert, private_key_pem(key), root.ref, issued_at=now)
    inter = state.ca.active_intermediate
    if inter is None:
        raise IssuanceError("no Kong intermediate to sign with")
    client = clients[step.name]
    validity = capped_validity(now, client.lifetime, inter.cert.not_valid_after_utc, skew)
    subject = client_subject(client)
    cert = anchor.sign_client(CA(inter.ref, inter.cert), build_csr(key, subject), subject, validity)
    require(Kind.KONG_CLIENT, cert, inter.cert, anchor)
    return IssuedEntry(cert, private_key_pem(key), inter.ref, (inter.cert,), now)
