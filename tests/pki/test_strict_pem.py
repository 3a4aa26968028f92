"""The strict PEM parser `verify` reads with: every non-whitespace byte in a certificate."""

from __future__ import annotations

import pytest

from ca_daemon.pki.bundle import (
    BundleError,
    certificate_pem,
    fingerprint,
    parse_pem_certificates,
    parse_pem_certificates_strict,
)
from ca_daemon.pki.keys import generate_key, private_key_pem
from tests.support.key_leaks import leaked
from tests.support.pki import self_signed_root

pytestmark = pytest.mark.usefixtures("clean_env")

_, ROOT_A = self_signed_root("a")
_, ROOT_B = self_signed_root("b")
A, B = certificate_pem(ROOT_A), certificate_pem(ROOT_B)
KEY = private_key_pem(generate_key()).decode()


@pytest.mark.parametrize(
    "text",
    [A, A + B, "\n\n" + A + "\n \t\n" + B + "\n\n", (A + B).replace("\n", "\r\n"), A.rstrip("\n")],
    ids=["one", "two", "blank lines", "crlf", "no final newline"],
)
def test_complete_blocks_with_whitespace_between_are_read(text: str) -> None:
    certs = parse_pem_certificates_strict(text)
    assert [fingerprint(c) for c in certs] == [fingerprint(c) for c in parse_pem_certificates(text)]


def _truncated(pem: str) -> str:
    lines = pem.splitlines(keepends=True)
    return "".join(lines[: len(lines) // 2])  # BEGIN line and half the base64, no END


BAD = {
    "garbage after the last block": (A + "garbage\n", A.count("\n") + 1, "text that is not part"),
    "garbage before the first block": ("# my roots\n" + A, 1, "text that is not part"),
    "garbage between blocks": (A + "x\n" + B, None, "text that is not part"),
    "an incomplete block at the end": (A + _truncated(B), None, "incomplete CERTIFICATE"),
    "an incomplete block in the middle": (_truncated(A) + B, 1, "incomplete CERTIFICATE"),
    "an END line only": (A + "-----END CERTIFICATE-----\n", None, "text that is not part"),
    "text glued to the END line": (A.rstrip("\n") + "tail\n", None, "text that is not part"),
    "a private key after the certificate": (A + KEY, None, "a private key block"),
    "a block that is not a certificate": (
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        1,
        "not a valid X.509",
    ),
    "nothing at all": ("", None, "no PEM certificate found"),
    "whitespace only": ("\n \n", None, "no PEM certificate found"),
}


@pytest.mark.parametrize(("text", "line", "says"), BAD.values(), ids=BAD.keys())
def test_anything_else_is_an_error_naming_the_line(text: str, line: int | None, says: str) -> None:
    with pytest.raises(BundleError) as caught:
        parse_pem_certificates_strict(text, what="bundle.pem")
    message = str(caught.value)
    assert message.startswith("bundle.pem: ")
    assert says in message
    if line is not None:
        assert f"line {line} " in message
    assert leaked(message, KEY.encode()) == []  # never quotes what it found
    assert "garbage" not in message and "my roots" not in message


def test_the_lenient_parser_still_skips_what_linkerd_refuses() -> None:
    """Reading our own state stays lenient; only `verify` judges as Linkerd does."""
    assert len(parse_pem_certificates(A + "garbage\n")) == 1
    assert len(parse_pem_certificates(A + _truncated(B))) == 1
