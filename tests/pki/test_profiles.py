"""Certificate profiles: what the local anchor builds passes, and each departure is caught."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_daemon.pki.keys import generate_key
from ca_daemon.pki.profiles import (
    Kind,
    Subject,
    build_csr,
    capped_validity,
    check_profile,
    sign_certificate,
    subject_alt_names,
)
from tests.support.clock import NOW
from tests.support.pki import self_signed_root

pytestmark = pytest.mark.usefixtures("clean_env")


def _ext(cert: x509.Certificate, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


def test_trust_anchor_profile() -> None:
    _, root = self_signed_root("root.linkerd.cluster.local")
    assert check_profile(Kind.TRUST_ANCHOR, root).ok
    bc = _ext(root, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    assert root.issuer == root.subject


def test_linkerd_issuer_profile() -> None:
    root_key, root = self_signed_root()
    key = generate_key()
    issuer = sign_certificate(
        Kind.LINKERD_ISSUER,
        Subject("identity.linkerd.cluster.local"),
        key.public_key(),
        root_key,
        root,
        capped_validity(NOW, timedelta(hours=48), root.not_valid_after_utc),
    )
    assert check_profile(Kind.LINKERD_ISSUER, issuer).ok
    bc = _ext(issuer, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = _ext(issuer, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    # No EKU at all: Go's Verify in Linkerd would demand serverAuth of any EKU present.
    assert not any(isinstance(e.value, x509.ExtendedKeyUsage) for e in issuer.extensions)
    assert isinstance(issuer.signature_hash_algorithm, hashes.SHA256)


def test_kong_client_profile_has_client_auth_and_sans() -> None:
    root_key, root = self_signed_root()
    key = generate_key()
    subject = Subject("kong.pay", ("kong.kong.svc.cluster.local",), ("spiffe://td/kong",))
    leaf = sign_certificate(
        Kind.KONG_CLIENT,
        subject,
        key.public_key(),
        root_key,
        root,
        capped_validity(NOW, timedelta(days=30), root.not_valid_after_utc),
    )
    assert check_profile(Kind.KONG_CLIENT, leaf).ok
    assert ExtendedKeyUsageOID.CLIENT_AUTH in _ext(leaf, x509.ExtendedKeyUsage).value
    assert not _ext(leaf, x509.BasicConstraints).value.ca
    assert subject_alt_names(leaf) == subject


def test_issuer_checks_catch_what_linkerd_rejects() -> None:
    root_key, root = self_signed_root()
    rsa_key = generate_key("rsa-2048")
    validity = capped_validity(NOW, timedelta(hours=48), root.not_valid_after_utc)
    rsa_issuer = sign_certificate(
        Kind.LINKERD_ISSUER, Subject("i"), rsa_key.public_key(), root_key, root, validity
    )
    assert any("ECDSA P-256" in p for p in check_profile(Kind.LINKERD_ISSUER, rsa_issuer).problems)

    ec_key = generate_key()
    leaf_as_issuer = sign_certificate(
        Kind.KONG_CLIENT, Subject("i", ("i",)), ec_key.public_key(), root_key, root, validity
    )
    problems = check_profile(Kind.LINKERD_ISSUER, leaf_as_issuer).problems
    assert any("not a CA" in p for p in problems)
    assert any("extendedKeyUsage" in p for p in problems)


def test_client_check_catches_a_ca_without_client_auth() -> None:
    _, root = self_signed_root()
    problems = check_profile(Kind.KONG_CLIENT, root).problems
    assert any("is a CA" in p for p in problems)
    assert any("clientAuth" in p for p in problems)


def test_rsa_roots_allowed_and_forged_roots_caught() -> None:
    key = generate_key("rsa-2048")
    validity = capped_validity(NOW, timedelta(days=1), None)
    root = sign_certificate(Kind.TRUST_ANCHOR, Subject("r"), key.public_key(), key, None, validity)
    assert check_profile(Kind.TRUST_ANCHOR, root).ok
    other_key, _ = self_signed_root()
    forged = sign_certificate(
        Kind.TRUST_ANCHOR, Subject("r"), key.public_key(), other_key, None, validity
    )
    assert "is not self-signed" in check_profile(Kind.TRUST_ANCHOR, forged).problems


def test_lifetime_is_capped_at_the_signer() -> None:
    signer_end = NOW + timedelta(hours=10)
    capped = capped_validity(NOW, timedelta(hours=48), signer_end)
    assert capped.not_after == signer_end
    uncapped = capped_validity(NOW, timedelta(hours=5), signer_end, backdate=timedelta(minutes=5))
    assert uncapped.not_after == NOW + timedelta(hours=5)
    assert uncapped.not_before == NOW - timedelta(minutes=5)


def test_csr_carries_subject_and_sans() -> None:
    key = generate_key()
    csr = build_csr(key, Subject("kong.pay", ("a.example",), ("spiffe://x/y",)))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://x/y"]


# --- check_profile, one rule at a time ----------------------------------------------------
# Each certificate below departs from a passing profile in exactly one way, so each rule
# is pinned by its own sentence: a rule removed from check_profile fails its case.

_CA_USAGE = x509.KeyUsage(
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
_CERT_SIGN_ONLY = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_CLIENT_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_NO_DIGITAL_SIGNATURE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _build(
    *,
    self_signed: bool = False,
    curve: ec.EllipticCurve | None = None,
    ca: bool | None = True,
    path_length: int | None = 0,
    usage: x509.KeyUsage | None = _CA_USAGE,
    usage_critical: bool = True,
    eku: list[x509.ObjectIdentifier] | None = None,
    digest: hashes.SHA256 | hashes.SHA384 | None = None,
) -> x509.Certificate:
    """A certificate with exactly these extensions; by default a valid Linkerd issuer."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    root_key, root = self_signed_root()
    signer_key, issuer_name = (key, _name("self")) if self_signed else (root_key, root.subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("self") if self_signed else _name("identity.linkerd"))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
    )
    if ca is not None:
        path = path_length if ca else None
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path), True)
    if usage is not None:
        builder = builder.add_extension(usage, critical=usage_critical)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(signer_key, digest or hashes.SHA256())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _problems(kind: Kind, cert: x509.Certificate) -> list[str]:
    return check_profile(kind, cert).problems


def test_the_builders_baselines_pass() -> None:
    assert _problems(Kind.LINKERD_ISSUER, _build()) == []
    assert _problems(Kind.KONG_INTERMEDIATE, _build()) == []
    assert _problems(Kind.TRUST_ANCHOR, _build(self_signed=True, path_length=1)) == []
    client = _build(ca=False, usage=_CLIENT_USAGE, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    assert _problems(Kind.KONG_CLIENT, client) == []


@pytest.mark.parametrize("kind", [Kind.LINKERD_ISSUER, Kind.KONG_INTERMEDIATE])
@pytest.mark.parametrize(
    ("departure", "problem"),
    [
        # Linkerd's issuer signs proxy leaves only: a pathlen above 0, or none at all,
        # would let it mint further CAs.
        ({"path_length": 1}, "pathlen is 1, expected 0"),
        ({"path_length": None}, "pathlen is None, expected 0"),
        ({"usage_critical": False}, "keyUsage must be critical"),
        ({"usage": _CERT_SIGN_ONLY}, "keyUsage must include keyCertSign and cRLSign"),
        ({"usage": None}, "keyUsage must include keyCertSign and cRLSign"),
        ({"ca": False}, "is not a CA (basicConstraints CA:TRUE missing)"),
        ({"ca": None}, "is not a CA (basicConstraints CA:TRUE missing)"),
        ({"curve": ec.SECP384R1()}, "key is ECDSA secp384r1; it must be ECDSA P-256"),
        ({"digest": hashes.SHA384()}, "signature must use SHA-256 (ECDSA-SHA256 or SHA256-RSA)"),
    ],
)
def test_intermediate_rules(kind: Kind, departure: dict[str, Any], problem: str) -> None:
    assert _problems(kind, _build(**departure)) == [problem]


def test_only_the_linkerd_issuer_must_carry_no_eku() -> None:
    with_eku = _build(eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    assert _problems(Kind.LINKERD_ISSUER, with_eku) == [
        "must carry no extendedKeyUsage (Linkerd verifies it for serverAuth)"
    ]
    assert _problems(Kind.KONG_INTERMEDIATE, with_eku) == []


@pytest.mark.parametrize(
    ("departure", "problem"),
    [
        ({"usage_critical": False}, "keyUsage must be critical"),
        ({"usage": _CERT_SIGN_ONLY}, "keyUsage must include keyCertSign and cRLSign"),
        ({"ca": False}, "is not a CA (basicConstraints CA:TRUE missing)"),
        (
            {"curve": ec.SECP384R1()},
            "key is ECDSA secp384r1; Linkerd accepts ECDSA P-256 or RSA 2048/4096",
        ),
        (
            {"eku": [ExtendedKeyUsageOID.CLIENT_AUTH]},
            "extendedKeyUsage does not allow serverAuth (Linkerd would reject it)",
        ),
        ({"digest": hashes.SHA384()}, "signature must use SHA-256 (ECDSA-SHA256 or SHA256-RSA)"),
    ],
)
def test_trust_anchor_rules(departure: dict[str, Any], problem: str) -> None:
    root = _build(**{"self_signed": True, "path_length": 1, **departure})
    assert _problems(Kind.TRUST_ANCHOR, root) == [problem]


@pytest.mark.parametrize("path_length", [None, 0, 3])
def test_a_trust_anchor_may_have_any_pathlen(path_length: int | None) -> None:
    root = _build(self_signed=True, path_length=path_length)
    assert _problems(Kind.TRUST_ANCHOR, root) == []
    server = _build(self_signed=True, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    assert _problems(Kind.TRUST_ANCHOR, server) == []


@pytest.mark.parametrize(
    ("departure", "problem"),
    [
        ({"usage": _NO_DIGITAL_SIGNATURE}, "keyUsage must include digitalSignature"),
        ({"usage": None}, "keyUsage must include digitalSignature"),
        ({"eku": None}, "extendedKeyUsage must include clientAuth"),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "extendedKeyUsage must include clientAuth"),
        ({"ca": True}, "is a CA; a client certificate must be a leaf"),
    ],
)
def test_kong_client_rules(departure: dict[str, Any], problem: str) -> None:
    base: dict[str, Any] = {
        "ca": False,
        "usage": _CLIENT_USAGE,
        "eku": [ExtendedKeyUsageOID.CLIENT_AUTH],
    }
    assert _problems(Kind.KONG_CLIENT, _build(**{**base, **departure})) == [problem]
