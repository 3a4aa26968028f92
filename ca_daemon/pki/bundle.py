"""Trust bundles: every root currently trusted, oldest first, each once."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# Fixed namespace so a root's Kong CA id is the same on every run and every replica.
KONG_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "ca-daemon.io")


class BundleError(ValueError):
    pass


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex: the identity used everywhere."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def stable_id(cert: x509.Certificate) -> str:
    """UUIDv5 of the certificate's SHA-256: a Kong entity id that never changes for it."""
    return str(uuid.uuid5(KONG_ID_NAMESPACE, fingerprint(cert)))


def parse_pem_certificates(data: bytes | str, *, what: str = "PEM data") -> list[x509.Certificate]:
    raw = data.encode() if isinstance(data, str) else data
    if b"-----BEGIN CERTIFICATE-----" not in raw:
        raise BundleError(f"{what}: no PEM certificate found")
    try:
        return x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise BundleError(f"{what}: cannot parse certificate: {exc}") from exc


def certificate_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def render_pem(certs: Iterable[x509.Certificate]) -> str:
    return "".join(certificate_pem(c) for c in certs)


def normalize(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """De-duplicate by fingerprint and order oldest first (not-before, then fingerprint)."""
    unique = {fingerprint(c): c for c in certs}
    return sorted(unique.values(), key=lambda c: (c.not_valid_before_utc, fingerprint(c)))


def render_bundle(roots: Sequence[x509.Certificate]) -> str:
    return render_pem(normalize(roots))


def bundle_hash(bundle_pem: str) -> str:
    """SHA-256 of the bundle text, which Linkerd records on pods as linkerd.io/trust-root-sha256."""
    return hashlib.sha256(bundle_pem.encode()).hexdigest()
