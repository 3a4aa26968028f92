"""A local anchor that cannot issue one Kong client: one credential's failure, contained."""

from __future__ import annotations

from cryptography import x509

from ca_daemon.anchor.base import CA
from ca_daemon.anchor.local import LocalAnchor
from ca_daemon.errors import AnchorError
from ca_daemon.pki.profiles import Subject, Validity


class RefusesBroken(LocalAnchor):
    def sign_client(
        self,
        intermediate: CA,
        csr: x509.CertificateSigningRequest,
        subject: Subject,
        validity: Validity,
    ) -> x509.Certificate:
        if subject.common_name == "kong.broken.upstream":
            raise AnchorError("the anchor refuses kong.broken.upstream")
        return super().sign_client(intermediate, csr, subject, validity)
