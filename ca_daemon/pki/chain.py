"""Chain checks, done the way the verifiers downstream do them.

Kong client certificates are checked with ``cryptography.x509.verification``'s
client verifier (RFC 5280 / webpki rules, as an upstream like nginx applies). The
Linkerd issuer is itself a CA, which that verifier refuses as a leaf by design, so
it is checked the way Linkerd's controller does: Go's ``x509.Verify`` against the
anchors, then ``IsCA``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import verification

from ca_daemon.pki.bundle import fingerprint


def _store(roots: Sequence[x509.Certificate]) -> verification.Store:
    return verification.Store(list(roots))


def verify_client_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
) -> list[str]:
    """Problems a TLS server verifying ``leaf`` as a client certificate would find."""
    if not roots:
        return ["no trusted roots to verify against"]
    verifier = verification.PolicyBuilder().store(_store(roots)).time(now).build_client_verifier()
    try:
        verifier.verify(leaf, list(intermediates))
    except verification.VerificationError as exc:
        return [f"client chain does not verify: {exc}"]
    return []


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def directly_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Names chain and ``issuer``'s key made ``cert``'s signature."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def issuing_root(
    cert: x509.Certificate, roots: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The root in ``roots`` whose key signed ``cert``, if any."""
    return next((root for root in roots if directly_issued_by(cert, root)), None)


def verify_ca_under_roots(
    ca: x509.Certificate, roots: Sequence[x509.Certificate], now: datetime
) -> list[str]:
    """Problems Linkerd's identity controller would find loading ``ca`` as its issuer."""
    problems = []
    root = issuing_root(ca, roots)
    if root is None:
        names = ", ".join(fingerprint(r)[:16] for r in roots) or "none"
        problems.append(
            f"is not signed by any root in the trust bundle (x509: certificate signed by "
            f"unknown authority; bundle roots: {names})"
        )
    elif not _valid_at(root, now):
        problems.append(f"its root {fingerprint(root)[:16]} is not valid now")
    if not _valid_at(ca, now):
        problems.append(
            f"is not valid now (valid {ca.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
            f"{ca.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
        )
    return problems
