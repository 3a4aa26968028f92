"""Certificate revocation lists: made (for the local anchor), read and written as PEM.

A CRL says which certificates its issuer revoked, until its next-update; a verifier that
checks CRLs (nginx's ``ssl_crl``, OpenSSL with ``-crl_check_all``) wants one for every CA
of the chain it verifies, so one is published for each CA in the bundle, revoked or not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# The name the CRLs are published under: a file next to the trust bundle, and a key of
# every bundles[] ConfigMap.
CRL_FILE = "crl.pem"

# As long as Vault's default (``crl`` config ``expiry``): the daemon makes it anew halfway.
LOCAL_CRL_LIFETIME = timedelta(hours=72)


def sign_crl(
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    revoked: Iterable[tuple[int, datetime]],
    now: datetime,
    lifetime: timedelta = LOCAL_CRL_LIFETIME,
) -> x509.CertificateRevocationList:
    """A CRL of ``issuer`` listing each (serial, revoked at), RFC 5280 §5: a CRL number
    (that only grows: the time it was made), the issuer's key identifier."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(now + lifetime)
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    for serial, at in sorted(revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
        )
    return builder.sign(key, hashes.SHA256())


def crls_pem(crls: Sequence[x509.CertificateRevocationList]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in crls)


def parse_crls(pem: str) -> list[x509.CertificateRevocationList]:
    """Every CRL in ``pem`` (ValueError if there is none, or one is malformed)."""
    begin = "-----BEGIN X509 CRL-----"
    blocks = [begin + part for part in pem.split(begin)[1:]]
    if not blocks:
        raise ValueError("no CRL in the text")
    return [x509.load_pem_x509_crl(block.encode()) for block in blocks]
