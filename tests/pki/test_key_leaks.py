"""No error path carries key bytes: every error is built from input that holds a real key.

The check is not "PRIVATE KEY" (a message may quote the base64 without its header) but
any 16-character run of the key's base64 body, in the message and in the whole
traceback (a chained library error would be logged with it).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from ca_daemon.anchor.base import CA
from ca_daemon.anchor.local import LocalAnchor
from ca_daemon.config.settings import Settings
from ca_daemon.errors import AnchorError
from ca_daemon.model.state import IssuedEntry
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import certificate_pem
from ca_daemon.pki.keys import KeyMaterialError, generate_key, load_private_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, build_csr, capped_validity, sign_certificate
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.publish.kong_admin import KongAdminPublisher
from ca_daemon.report.verify import (
    Report,
    check_kong_client,
    check_linkerd_issuer,
    verify_directory,
)
from tests.support.clock import NOW
from tests.support.key_leaks import key_body, leaked
from tests.support.pki import self_signed_root

pytestmark = pytest.mark.usefixtures("clean_env")


def everything_said(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


PEM = private_key_pem(generate_key())
RSA_PEM = private_key_pem(generate_key("rsa-2048"))
LINES = PEM.decode().splitlines()


def _corrupt_middle(pem: bytes) -> bytes:
    lines = pem.decode().splitlines()
    middle = len(lines) // 2
    lines[middle] = "!" + lines[middle][1:]
    return "\n".join(lines).encode()


GARBAGE = {
    "truncated": "\n".join(LINES[:-2]).encode(),
    "no footer": "\n".join(LINES[:-1]).encode(),
    "corrupt line": _corrupt_middle(PEM),
    "body without header": ("junk\n" + "\n".join(LINES[1:-1])).encode(),
    "two headers": ("\n".join([LINES[0], *LINES])).encode(),
    "rsa truncated": RSA_PEM[: len(RSA_PEM) // 2],
    "json-escaped": json.dumps({"key": PEM.decode()}).encode(),
}


def test_the_check_itself_finds_a_quoted_fragment() -> None:
    """Guard the guard: a message quoting 24 characters of the key is caught."""
    body = "".join(key_body(PEM))
    assert leaked(f"cannot load {body[30:54]!r}", PEM)
    assert not leaked("cannot load private key: not a PEM private key", PEM)


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_load_private_key_never_quotes_its_input(garbage: bytes) -> None:
    with pytest.raises(KeyMaterialError) as caught:
        load_private_key(garbage)
    assert str(caught.value) == "cannot load private key: not a PEM private key"
    assert leaked(everything_said(caught.value), PEM, RSA_PEM) == []


def test_a_wrong_passphrase_is_named_without_the_key() -> None:
    encrypted = private_key_pem(generate_key(), b"right")
    with pytest.raises(KeyMaterialError) as caught:
        load_private_key(encrypted, b"wrong")
    assert "wrong passphrase or corrupt key" in str(caught.value)
    assert leaked(everything_said(caught.value), encrypted) == []


def _local_root(tmp_path: Path) -> tuple[CA, Path]:
    anchor = LocalAnchor(tmp_path, b"passphrase")
    validity = capped_validity(NOW, timedelta(days=365), None)
    root = anchor.create_root("root-1", Subject("root"), "ec-p256", validity)
    return root, tmp_path / "anchor" / "root-1.key"


def _sign_issuer(anchor: LocalAnchor, root: CA) -> x509.Certificate:
    key = generate_key()
    validity = capped_validity(NOW, timedelta(hours=48), root.cert.not_valid_after_utc)
    return anchor.sign_ca(root, build_csr(key, Subject("identity")), Subject("identity"), validity)


@pytest.mark.parametrize(
    "damage",
    [
        _corrupt_middle,
        lambda pem: pem[: len(pem) // 2],
        lambda pem: b"junk\n" + b"\n".join(pem.splitlines()[1:-1]),
    ],
    ids=["corrupt line", "truncated", "no header"],
)
def test_local_anchor_with_a_corrupt_key_file(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    root, key_file = _local_root(tmp_path)
    on_disk = key_file.read_bytes()
    key_file.write_bytes(damage(on_disk))
    with pytest.raises(AnchorError) as caught:
        _sign_issuer(LocalAnchor(tmp_path, b"passphrase"), root)
    assert "CA root-1: cannot load private key" in str(caught.value)
    assert leaked(everything_said(caught.value), on_disk) == []


def test_local_anchor_with_the_wrong_passphrase(tmp_path: Path) -> None:
    root, key_file = _local_root(tmp_path)
    with pytest.raises(AnchorError) as caught:
        _sign_issuer(LocalAnchor(tmp_path, b"another"), root)
    assert "wrong passphrase or corrupt key" in str(caught.value)
    assert leaked(everything_said(caught.value), key_file.read_bytes()) == []


def _issuer_and_key() -> tuple[x509.Certificate, x509.Certificate, bytes]:
    root_key, root = self_signed_root()
    key = generate_key()
    validity = capped_validity(NOW, timedelta(hours=48), None)
    issuer = sign_certificate(
        Kind.LINKERD_ISSUER, Subject("identity"), key.public_key(), root_key, root, validity
    )
    return root, issuer, private_key_pem(key)


@pytest.mark.parametrize("given", ["another key", *GARBAGE])
def test_verify_names_a_bad_key_without_quoting_it(given: str) -> None:
    root, issuer, own_key = _issuer_and_key()
    other = private_key_pem(generate_key())
    key_pem = other if given == "another key" else GARBAGE[given]
    report = Report()
    check_linkerd_issuer(certificate_pem(issuer).encode(), key_pem, [root], NOW, report)
    check_kong_client("payments", certificate_pem(issuer).encode(), key_pem, [root], NOW, report)
    assert any("linkerd issuer:" in p and "key" in p for p in report.problems)
    assert leaked("\n".join(report.problems + report.checked), own_key, other, PEM, RSA_PEM) == []


def test_verify_directory_with_key_fragments_in_place_of_keys(tmp_path: Path) -> None:
    root, issuer, issuer_key = _issuer_and_key()
    world = TrustWorld(
        roots=(root,),
        linkerd_issuer=IssuedEntry(cert=issuer, key=GARBAGE["truncated"], signer_ref="r"),
    )
    DirectoryPublisher(tmp_path).publish(world)
    report = verify_directory(tmp_path, NOW)
    assert "linkerd issuer: cannot load private key: not a PEM private key" in report.problems
    assert leaked("\n".join(report.problems + report.checked), PEM, issuer_key) == []


def _echoing_proxy(plain_text: bool, window: bool = False) -> httpx.MockTransport:
    """A Kong behind a proxy that refuses a certificate and echoes the request body back.

    ``window``: only a slice of the body from inside the key, without its PEM header.
    """

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path == "/":
            return httpx.Response(200, json={"configuration": {"database": "postgres"}})
        if request.method == "PUT" and path.startswith("/certificates/"):
            echoed = request.content.decode()
            if window:
                start = echoed.index("-----BEGIN PRIVATE KEY-----") + 40
                echoed = f"invalid value near '{echoed[start : start + 60]}'"
            if plain_text:
                return httpx.Response(502, text=f"<html>bad gateway for {echoed}</html>")
            return httpx.Response(400, json={"message": f"schema violation: {echoed}"})
        if request.method == "GET" and path.count("/") == 2:
            return httpx.Response(404, json={"message": "Not found"})
        if request.method == "GET":
            return httpx.Response(200, json={"data": [], "next": None})
        return httpx.Response(200, json={})

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(
    ("plain_text", "window"),
    [
        (False, False),
        (True, False),
        (False, True),
    ],
    ids=["json", "html", "headerless-window"],
)
def test_kong_refusing_a_key_is_reported_without_it(
    make_settings: Callable[..., Settings], tmp_path: Path, plain_text: bool, window: bool
) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    kong: dict[str, Any] = {
        "delivery": "admin-api",
        "admin_api": {"url": "http://kong.invalid:8001", "token_file": str(token)},
        "clients": [{"name": "payments", "common_name": "kong.pay", "service": "payments"}],
    }
    settings = make_settings({"kong": kong})
    root_key, root = self_signed_root()
    validity = capped_validity(NOW, timedelta(days=30), None)
    inter_key = generate_key()
    inter = sign_certificate(
        Kind.KONG_INTERMEDIATE, Subject("kong"), inter_key.public_key(), root_key, root, validity
    )
    client_key = generate_key()
    leaf = sign_certificate(
        Kind.KONG_CLIENT, Subject("kong.pay"), client_key.public_key(), inter_key, inter, validity
    )
    key_pem = private_key_pem(client_key)
    world = TrustWorld(
        roots=(root,),
        kong_clients={
            "payments": IssuedEntry(cert=leaf, key=key_pem, signer_ref="k", chain=(inter,))
        },
    )
    report = KongAdminPublisher(
        settings.kong, transport=_echoing_proxy(plain_text, window)
    ).publish(world)
    refused = [e for obj, e in report.errors.items() if obj.startswith("certificate/")]
    assert refused, report.errors
    assert leaked("\n".join(report.errors.values()), key_pem) == []
