"""Certificate profiles: what each certificate in the chain must look like.

One source of truth for every profile. The local anchor builds certificates from
it, the Vault anchor's output is checked against it, and ``verify`` checks what
is published against it. The Linkerd rules come from linkerd2
``pkg/issuercerts`` (install/upgrade/check) and ``pkg/identity`` (the controller).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.pki.keys import PrivateKey, PublicKey, describe_public_key


class Kind(enum.StrEnum):
    """The four kinds of certificate the daemon owns; the values are the metric labels."""

    TRUST_ANCHOR = "trust-anchor"
    LINKERD_ISSUER = "linkerd-issuer"
    KONG_INTERMEDIATE = "kong-intermediate"
    KONG_CLIENT = "kong-client"


_E = TypeVar("_E", bound=x509.ExtensionType)

# Path lengths: a root signs one CA level (issuer or Kong intermediate), which signs leaves.
ROOT_PATH_LENGTH = 1
INTERMEDIATE_PATH_LENGTH = 0


@dataclass(frozen=True)
class Subject:
    common_name: str
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()


@dataclass(frozen=True)
class Validity:
    not_before: datetime
    not_after: datetime


def capped_validity(
    now: datetime,
    lifetime: timedelta,
    signer_not_after: datetime | None,
    backdate: timedelta = timedelta(0),
) -> Validity:
    """Lifetime from ``now``, never past the signer's not-after, whatever a backend allows.

    A certificate that outlives its signer is invalid for that remainder anyway
    (OpenBao lets an intermediate outlive its root with only a warning), so the
    daemon caps it itself and schedules renewal from the real end.
    """
    not_after = now + lifetime
    if signer_not_after is not None and not_after > signer_not_after:
        not_after = signer_not_after
    return Validity(not_before=now - backdate, not_after=not_after)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(subject: Subject) -> x509.SubjectAlternativeName | None:
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in subject.dns_names]
    names += [x509.UniformResourceIdentifier(u) for u in subject.uris]
    return x509.SubjectAlternativeName(names) if names else None


def build_csr(key: PrivateKey, subject: Subject) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(subject.common_name))
    san = _san(subject)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256())


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _client_key_usage(public_key: PublicKey) -> x509.KeyUsage:
    # RSA client keys may also be used for key transport in old TLS; EC keys never are.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def sign_certificate(
    kind: Kind,
    subject: Subject,
    public_key: PublicKey,
    signer_key: PrivateKey,
    signer_cert: x509.Certificate | None,
    validity: Validity,
) -> x509.Certificate:
    """Build and sign a certificate of ``kind``; ``signer_cert`` None means self-signed."""
    issuer_name = signer_cert.subject if signer_cert is not None else _name(subject.common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject.common_name))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    if kind is Kind.KONG_CLIENT:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(_client_key_usage(public_key), critical=True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    else:
        path_length = ROOT_PATH_LENGTH if kind is Kind.TRUST_ANCHOR else INTERMEDIATE_PATH_LENGTH
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), True
        )
        builder = builder.add_extension(_ca_key_usage(), critical=True)
    san = _san(subject)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(signer_key, hashes.SHA256())


# --- checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileCheck:
    kind: Kind
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _ext(cert: x509.Certificate, ext_type: type[_E]) -> x509.Extension[_E] | None:
    try:
        return cert.extensions.get_extension_for_class(ext_type)
    except x509.ExtensionNotFound:
        return None


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def _signature_is_sha256(cert: x509.Certificate) -> bool:
    return isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def _ca_problems(cert: x509.Certificate, path_length: int | None) -> list[str]:
    problems = []
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None or not bc.value.ca:
        problems.append("is not a CA (basicConstraints CA:TRUE missing)")
    elif path_length is not None and bc.value.path_length != path_length:
        problems.append(f"pathlen is {bc.value.path_length}, expected {path_length}")
    ku = _ext(cert, x509.KeyUsage)
    if ku is None or not (ku.value.key_cert_sign and ku.value.crl_sign):
        problems.append("keyUsage must include keyCertSign and cRLSign")
    elif not ku.critical:
        problems.append("keyUsage must be critical")
    return problems


def _eku_allows_server_auth(cert: x509.Certificate) -> bool:
    # Go's x509.Verify with default options requires every EKU in the chain to allow
    # serverAuth; Linkerd verifies its issuer that way, so an EKU must include it.
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is None:
        return True
    usages = set(eku.value)
    return bool(
        usages & {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    )


def check_profile(kind: Kind, cert: x509.Certificate) -> ProfileCheck:
    """Every way ``cert`` departs from the profile of ``kind``, as readable sentences."""
    problems: list[str] = []
    key = cert.public_key()
    if not _signature_is_sha256(cert):
        problems.append("signature must use SHA-256 (ECDSA-SHA256 or SHA256-RSA)")
    if kind is Kind.TRUST_ANCHOR:
        if not (
            _is_p256(key) or (isinstance(key, rsa.RSAPublicKey) and key.key_size in (2048, 4096))
        ):
            problems.append(
                f"key is {describe_public_key(key)}; Linkerd accepts ECDSA P-256 or RSA 2048/4096"
            )
        if not is_self_signed(cert):
            problems.append("is not self-signed")
        problems += _ca_problems(cert, path_length=None)
        if not _eku_allows_server_auth(cert):
            problems.append("extendedKeyUsage does not allow serverAuth (Linkerd would reject it)")
    elif kind in (Kind.LINKERD_ISSUER, Kind.KONG_INTERMEDIATE):
        if not _is_p256(key):
            problems.append(f"key is {describe_public_key(key)}; it must be ECDSA P-256")
        problems += _ca_problems(cert, path_length=INTERMEDIATE_PATH_LENGTH)
        if kind is Kind.LINKERD_ISSUER and _ext(cert, x509.ExtendedKeyUsage) is not None:
            problems.append("must carry no extendedKeyUsage (Linkerd verifies it for serverAuth)")
    else:
        bc = _ext(cert, x509.BasicConstraints)
        if bc is not None and bc.value.ca:
            problems.append("is a CA; a client certificate must be a leaf")
        eku = _ext(cert, x509.ExtendedKeyUsage)
        if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku.value:
            problems.append("extendedKeyUsage must include clientAuth")
        ku = _ext(cert, x509.KeyUsage)
        if ku is None or not ku.value.digital_signature:
            problems.append("keyUsage must include digitalSignature")
    return ProfileCheck(kind=kind, problems=problems)


def is_self_signed(cert: x509.Certificate) -> bool:
    return directly_issued_by(cert, cert)


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode()


def subject_alt_names(cert: x509.Certificate) -> Subject:
    san = _ext(cert, x509.SubjectAlternativeName)
    dns: Sequence[str] = san.value.get_values_for_type(x509.DNSName) if san else []
    uris: Sequence[str] = (
        san.value.get_values_for_type(x509.UniformResourceIdentifier) if san else []
    )
    return Subject(common_name=common_name(cert), dns_names=tuple(dns), uris=tuple(uris))
