"""Certificate profiles: what the local anchor builds passes, and each departure is caught."""

from __future__ import annotations

from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

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
from tests.unit.conftest import NOW, self_signed_root


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
