"""The small interface every trust-anchor backend implements.

A backend holds CA keys that never leave it: the roots and the Kong intermediate.
Keys the daemon must hand out (the Linkerd issuer's, Kong clients') are generated
by the daemon and only their CSRs reach the backend.

CAs are addressed by a name the daemon chooses (``root-3``, ``kong-5``). Creating
a CA whose name already exists adopts the existing one, so a crash between
creating a CA and recording it in the journal never leaves two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from cryptography import x509

from ca_daemon.pki.keys import KeyType
from ca_daemon.pki.profiles import Subject, Validity


@dataclass(frozen=True)
class CA:
    ref: str
    cert: x509.Certificate
    # The backend's default issuer (set at each activation): from ``existing_cas`` only, so
    # a journal rebuilt from the anchor knows which root was active.
    default: bool = field(default=False, compare=False)


class Anchor(Protocol):
    description: str

    def check(self) -> None:
        """Raise AnchorError unless the backend answers and is usable."""

    def create_root(self, ref: str, subject: Subject, key_type: KeyType, validity: Validity) -> CA:
        """A new self-signed root whose key is generated inside the backend."""

    def create_intermediate(self, ref: str, root: CA, subject: Subject, validity: Validity) -> CA:
        """A new intermediate CA (the Kong intermediate) whose key stays in the backend."""

    def sign_ca(
        self, root: CA, csr: x509.CertificateSigningRequest, subject: Subject, validity: Validity
    ) -> x509.Certificate:
        """Sign an intermediate CA for a key the daemon holds (the Linkerd issuer)."""

    def sign_client(
        self,
        intermediate: CA,
        csr: x509.CertificateSigningRequest,
        subject: Subject,
        validity: Validity,
    ) -> x509.Certificate:
        """Sign a clientAuth leaf under an intermediate held in the backend."""

    def set_default(self, root: CA, intermediate: CA | None) -> None:
        """Make ``root`` (and the Kong ``intermediate``) the backend's default issuers, for
        whoever else signs there; the daemon itself always names the issuer it signs with."""


@runtime_checkable
class Revokes(Protocol):
    """A backend that revokes certificates its CAs signed and publishes their CRLs."""

    def revoke(self, cert: x509.Certificate, issuer: CA) -> None:
        """Revoke ``cert`` (signed by ``issuer``); revoking it again changes nothing."""

    def crls(
        self, cas: Sequence[CA], now: datetime, rebuild: bool
    ) -> list[x509.CertificateRevocationList]:
        """The current CRL of each of ``cas``; ``rebuild``: made anew first (a fresh
        next-update), else as the backend holds it."""


def revoker(anchor: object) -> Revokes | None:
    """``anchor`` as a revoking backend, or None when it cannot revoke."""
    return anchor if isinstance(anchor, Revokes) else None


@runtime_checkable
class ListsCAs(Protocol):
    """A backend that can list the CAs it holds: how a lost journal is rebuilt."""

    def existing_cas(self) -> list[CA]:
        """Every CA the daemon named (``root-N``, ``kong-N``) that the backend holds, with
        its certificate; raise AnchorError when the backend cannot tell."""


def existing_cas(anchor: object) -> list[CA] | None:
    """The anchor's named CAs; None when this backend cannot list them."""
    if isinstance(anchor, ListsCAs):
        return anchor.existing_cas()
    return None
