"""The tests' certificate builders, in two kinds.

Scaffolding (``KeyPair``, ``make_ca``, ``issue``, ``rsa_key_pem``; plain ``cryptography``):
serving certs, mTLS clients and the like for the real servers and the tests. They are not
the daemon's output and deliberately make no claims about Linkerd or Vault profiles.

The daemon's own kinds (``self_signed_root``, ``issue_profiled``, ``issued_entry``): made
with ``ca_daemon.pki.profiles``, as the daemon makes them, at the fixed ``NOW`` unless told.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_daemon.model.state import IssuedEntry
from ca_daemon.pki.keys import generate_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, capped_validity, sign_certificate
from tests.support.clock import NOW

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class KeyPair:
    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write `<stem>.crt` and `<stem>.key`; returns their paths."""
        crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        crt.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return crt, key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str, days: int = 1) -> KeyPair:
    """A self-signed ECDSA P-256 CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert, key)


def issue(
    ca: KeyPair,
    common_name: str,
    *,
    server: bool = False,
    client: bool = False,
    dns_names: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    days: int = 1,
) -> KeyPair:
    """An ECDSA P-256 end-entity certificate signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return KeyPair(builder.sign(ca.key, hashes.SHA256()), key)


def rsa_key_pem(bits: int = 2048) -> bytes:
    """A PEM RSA private key (PKCS#1), e.g. for service-account token signing."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


# --- the daemon's own kinds, made with its profiles -----------------------------------------


def self_signed_root(cn: str = "root", now: datetime = NOW, days: int = 365) -> Any:
    key = generate_key()
    validity = capped_validity(now, timedelta(days=days), None)
    return key, sign_certificate(
        Kind.TRUST_ANCHOR, Subject(cn), key.public_key(), key, None, validity
    )


def issue_profiled(kind: Kind, subject: Subject, signer_key, signer, lifetime: timedelta):  # type: ignore[no-untyped-def]
    key = generate_key()
    validity = capped_validity(NOW, lifetime, signer.not_valid_after_utc)
    cert = sign_certificate(kind, subject, key.public_key(), signer_key, signer, validity)
    return key, cert


def issued_entry(name: str) -> IssuedEntry:
    root_key, root = self_signed_root()
    key = generate_key()
    validity = capped_validity(NOW, timedelta(days=30), None)
    cert = sign_certificate(
        Kind.KONG_CLIENT, Subject(f"{name}.upstream"), key.public_key(), root_key, root, validity
    )
    return IssuedEntry(cert, private_key_pem(key), "root-1", (), NOW)
