"""Trust bundles: parsing, de-duplication, oldest-first order, rendering, stable ids."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ca_daemon.pki.bundle import (
    BundleError,
    bundle_hash,
    fingerprint,
    normalize,
    parse_pem_certificates,
    render_bundle,
    stable_id,
)
from tests.support.clock import NOW
from tests.support.pki import self_signed_root

pytestmark = pytest.mark.usefixtures("clean_env")


def test_bundle_is_deduplicated_and_oldest_first() -> None:
    _, old = self_signed_root("old", now=NOW - timedelta(days=100))
    _, new = self_signed_root("new", now=NOW)
    rendered = render_bundle([new, old, new, old])
    parsed = parse_pem_certificates(rendered)
    assert [fingerprint(c) for c in parsed] == [fingerprint(old), fingerprint(new)]
    assert normalize([new, old]) == normalize([old, new])
    assert render_bundle([old, new]) == render_bundle([new, old])  # order-independent output


def test_bundle_hash_changes_with_content() -> None:
    _, a = self_signed_root("a")
    _, b = self_signed_root("b")
    assert bundle_hash(render_bundle([a])) != bundle_hash(render_bundle([a, b]))
    assert len(bundle_hash(render_bundle([a]))) == 64


def test_stable_id_is_a_uuid5_of_the_fingerprint() -> None:
    _, root = self_signed_root()
    again = parse_pem_certificates(render_bundle([root]))[0]
    assert stable_id(root) == stable_id(again)
    assert stable_id(root)[14] == "5"  # version nibble of a UUIDv5
    _, other = self_signed_root()
    assert stable_id(root) != stable_id(other)


@pytest.mark.parametrize("data", [b"", b"hello", b"-----BEGIN CERTIFICATE-----\nnope\n"])
def test_garbage_is_a_bundle_error(data: bytes) -> None:
    with pytest.raises(BundleError):
        parse_pem_certificates(data, what="test bundle")
