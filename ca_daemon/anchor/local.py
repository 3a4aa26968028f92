"""The embedded-default anchor: CA keys encrypted at rest in a local directory.

Layout under ``anchor.local.dir``::

    anchor/<ref>.crt     the CA certificate
    anchor/<ref>.key     its key, PKCS#8 encrypted with the passphrase, mode 0600
    passphrase           generated on first use unless passphrase_file points elsewhere
"""

from __future__ import annotations

import re
import secrets
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca_daemon.anchor.base import CA, AnchorError
from ca_daemon.files import ensure_private_dir, write_atomic
from ca_daemon.pki.bundle import certificate_pem
from ca_daemon.pki.keys import (
    KeyMaterialError,
    KeyType,
    PrivateKey,
    PublicKey,
    generate_key,
    load_private_key,
    private_key_pem,
)
from ca_daemon.pki.profiles import Kind, Subject, Validity, sign_certificate

_REF = re.compile(r"^[a-z0-9][-a-z0-9]*$")


def load_or_create_passphrase(path: Path) -> bytes:
    """The passphrase protecting keys at rest; generated (0600) the first time."""
    if path.exists():
        value = path.read_bytes().strip()
        if not value:
            raise AnchorError(f"passphrase file {path} is empty")
        return value
    ensure_private_dir(path.parent)
    value = secrets.token_urlsafe(32).encode()
    write_atomic(path, value + b"\n", mode=0o600)
    return value


class LocalAnchor:
    def __init__(self, directory: Path, passphrase: bytes) -> None:
        self._dir = directory / "anchor"
        self._passphrase = passphrase
        self.description = f"local anchor in {directory}"
        # Decrypting a CA key derives a key from the passphrase: once per CA, not per
        # signature, or renewing thousands of clients would spend its time there.
        self._keys: dict[str, PrivateKey] = {}
        self._lock = threading.Lock()

    def check(self) -> None:
        try:
            ensure_private_dir(self._dir)
        except OSError as exc:
            raise AnchorError(f"{self.description}: cannot use directory: {exc.strerror}") from exc

    def _paths(self, ref: str) -> tuple[Path, Path]:
        if not _REF.match(ref):
            raise AnchorError(f"invalid CA name {ref!r}")
        return self._dir / f"{ref}.crt", self._dir / f"{ref}.key"

    def _load(self, ref: str) -> tuple[CA, PrivateKey] | None:
        cert_path, key_path = self._paths(ref)
        if not (cert_path.exists() and key_path.exists()):
            return None
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        try:
            key = load_private_key(key_path.read_bytes(), self._passphrase)
        except KeyMaterialError as exc:
            raise AnchorError(f"{self.description}: CA {ref}: {exc}") from None
        return CA(ref, cert), key

    def _signer(self, ca: CA) -> PrivateKey:
        with self._lock:
            key = self._keys.get(ca.ref)
        if key is None:
            loaded = self._load(ca.ref)
            if loaded is None:
                raise AnchorError(f"{self.description}: CA {ca.ref} is missing")
            if loaded[0].cert != ca.cert:
                raise AnchorError(f"{self.description}: CA {ca.ref} on disk is another certificate")
            key = loaded[1]
            with self._lock:
                self._keys[ca.ref] = key
        return key

    def set_default(self, root: CA, intermediate: CA | None) -> None:
        """Nothing else signs with the local anchor: the journal's roles are the default."""

    def _store(self, ref: str, cert: x509.Certificate, key_pem: bytes) -> CA:
        cert_path, key_path = self._paths(ref)
        ensure_private_dir(self._dir)
        write_atomic(key_path, key_pem, mode=0o600)
        write_atomic(cert_path, certificate_pem(cert).encode(), mode=0o644)
        return CA(ref, cert)

    def create_root(self, ref: str, subject: Subject, key_type: KeyType, validity: Validity) -> CA:
        existing = self._load(ref)
        if existing is not None:
            return existing[0]
        key = generate_key(key_type)
        cert = sign_certificate(Kind.TRUST_ANCHOR, subject, key.public_key(), key, None, validity)
        return self._store(ref, cert, private_key_pem(key, self._passphrase))

    def create_intermediate(self, ref: str, root: CA, subject: Subject, validity: Validity) -> CA:
        existing = self._load(ref)
        if existing is not None:
            return existing[0]
        key = generate_key("ec-p256")
        cert = sign_certificate(
            Kind.KONG_INTERMEDIATE,
            subject,
            key.public_key(),
            self._signer(root),
            root.cert,
            validity,
        )
        return self._store(ref, cert, private_key_pem(key, self._passphrase))

    def sign_ca(
        self, root: CA, csr: x509.CertificateSigningRequest, subject: Subject, validity: Validity
    ) -> x509.Certificate:
        return sign_certificate(
            Kind.LINKERD_ISSUER, subject, _csr_key(csr), self._signer(root), root.cert, validity
        )

    def sign_client(
        self,
        intermediate: CA,
        csr: x509.CertificateSigningRequest,
        subject: Subject,
        validity: Validity,
    ) -> x509.Certificate:
        signer = self._signer(intermediate)
        return sign_certificate(
            Kind.KONG_CLIENT, subject, _csr_key(csr), signer, intermediate.cert, validity
        )


def _csr_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    if not csr.is_signature_valid:
        raise AnchorError("CSR signature is invalid")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise AnchorError(f"unsupported CSR key type {type(key).__name__}")
    return key
