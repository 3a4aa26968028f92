"""The Vault anchor refuses a certificate that the CA it asked for did not sign.

The engine does not check the chain of what an anchor returns, so this check in
``VaultPkiAnchor._sign`` is the only guard against a certificate signed by the wrong
issuer (a mount's issuer replaced, a ref pointing elsewhere, a journal out of step).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from ca_daemon.anchor.base import CA
from ca_daemon.anchor.vault.client import VaultClient
from ca_daemon.anchor.vault.pki import VaultPkiAnchor
from ca_daemon.config.settings import VaultAnchor, VaultAuth
from ca_daemon.errors import AnchorError
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.pki.keys import generate_key
from ca_daemon.pki.profiles import Kind, Subject, build_csr, capped_validity, sign_certificate
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import unique

pytestmark = pytest.mark.integration

ISSUER = Subject("identity.linkerd.cluster.local")
CLIENT = Subject("kong.payments.upstream", ("kong.kong.svc.cluster.local",))


@pytest.fixture(scope="module")
def anchor(openbao: OpenBao) -> VaultPkiAnchor:
    prefix = unique("signcheck")
    cfg = VaultAnchor(
        address=openbao.address,
        auth=VaultAuth(token=openbao.token),
        root_mount=f"{prefix}-root",
        kong_mount=f"{prefix}-kong",
    )
    vault = VaultPkiAnchor(VaultClient(cfg))
    vault.check()
    return vault


def _look_alike(cert: x509.Certificate) -> x509.Certificate:
    """Same subject, same extensions' profile, another key: names chain, signatures do not."""
    key = generate_key()
    now = datetime.now(UTC)
    validity = capped_validity(now, timedelta(days=30), None)
    cn = cert.subject.rfc4514_string().removeprefix("CN=")
    return sign_certificate(Kind.TRUST_ANCHOR, Subject(cn), key.public_key(), key, None, validity)


def _sign_issuer(vault: VaultPkiAnchor, signer: CA) -> x509.Certificate:
    validity = capped_validity(datetime.now(UTC), timedelta(hours=48), None)
    return vault.sign_ca(signer, build_csr(generate_key(), ISSUER), ISSUER, validity)


def test_an_issuer_from_another_root_than_expected_is_refused(anchor: VaultPkiAnchor) -> None:
    validity = capped_validity(datetime.now(UTC), timedelta(days=30), None)
    one = anchor.create_root("root-1", Subject("root.one"), "ec-p256", validity)
    two = anchor.create_root("root-2", Subject("root.two"), "ec-p256", validity)
    assert directly_issued_by(_sign_issuer(anchor, one), one.cert)  # the control

    # Vault signs with its issuer root-1, the daemon expected root-2's certificate.
    for expected in (two.cert, _look_alike(one.cert)):
        with pytest.raises(AnchorError, match=r"not signed by root-1"):
            _sign_issuer(anchor, CA("root-1", expected))


def test_a_kong_client_from_another_intermediate_is_refused(anchor: VaultPkiAnchor) -> None:
    validity = capped_validity(datetime.now(UTC), timedelta(days=30), None)
    root = anchor.create_root("root-k", Subject("root.k"), "ec-p256", validity)
    inter = anchor.create_intermediate("kong-k", root, Subject("kong.k"), validity)
    client_validity = capped_validity(
        datetime.now(UTC), timedelta(days=1), inter.cert.not_valid_after_utc
    )
    csr = build_csr(generate_key(), CLIENT)
    assert directly_issued_by(anchor.sign_client(inter, csr, CLIENT, client_validity), inter.cert)

    with pytest.raises(AnchorError, match=r"not signed by kong-k"):
        anchor.sign_client(
            CA("kong-k", _look_alike(inter.cert)),
            build_csr(generate_key(), CLIENT),
            CLIENT,
            client_validity,
        )
