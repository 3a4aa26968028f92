"""Trust bundles: every root currently trusted, oldest first, each once."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_daemon.errors import PkiError

# Fixed namespace so a root's Kong CA id is the same on every run and every replica.
KONG_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "ca-daemon.io")


class BundleError(PkiError):
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


_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]*?)-----END CERTIFICATE-----"
)
_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")


def _stray(raw: bytes, start: int, end: int, what: str) -> BundleError | None:
    """An error for the first non-whitespace byte in ``raw[start:end]``; never quotes it."""
    text = raw[start:end]
    stripped = text.lstrip()
    if not stripped:
        return None
    offset = start + len(text) - len(stripped)
    line = raw.count(b"\n", 0, offset) + 1
    label = _LABEL.match(stripped)
    if label is None:
        found = "text that is not part of a PEM certificate block"
    elif label.group(1) == b"CERTIFICATE":
        found = "an incomplete CERTIFICATE block (no matching END line, or bad base64)"
    else:
        found = f"a {label.group(1).decode().lower()} block, not a CERTIFICATE"
    return BundleError(f"{what}: not a PEM certificate: line {line} holds {found}")


def parse_pem_certificates_strict(
    data: bytes | str, *, what: str = "PEM data"
) -> list[x509.Certificate]:
    """As Linkerd reads a bundle: only complete CERTIFICATE blocks, whitespace between.

    Every other byte (an unterminated block, a key, trailing text) is an error, where
    ``parse_pem_certificates`` skips it. Errors name the line, never the content.
    """
    raw = data.encode() if isinstance(data, str) else data
    certs: list[x509.Certificate] = []
    position = 0
    for block in _BLOCK.finditer(raw):
        error = _stray(raw, position, block.start(), what)
        if error is not None:
            raise error
        try:
            certs.append(x509.load_pem_x509_certificate(block.group(0)))
        except ValueError:
            line = raw.count(b"\n", 0, block.start()) + 1
            raise BundleError(
                f"{what}: not a PEM certificate: the block at line {line} is not a valid "
                "X.509 certificate"
            ) from None
        position = block.end()
    error = _stray(raw, position, len(raw), what)
    if error is not None:
        raise error
    if not certs:
        raise BundleError(f"{what}: no PEM certificate found")
    return certs


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
