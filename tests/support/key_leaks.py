"""Whether a text gives away any part of a private key."""

from __future__ import annotations

CHUNK = 16


def key_body(pem: bytes) -> list[str]:
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


def leaked(text: str, *pems: bytes) -> list[str]:
    """Every run of ``CHUNK`` base64 characters of a key that ``text`` contains."""
    found = ["-----BEGIN"] if "-----BEGIN" in text else []
    for pem in pems:
        for line in key_body(pem):
            found += [
                line[i : i + CHUNK]
                for i in range(0, max(len(line) - CHUNK, 0) + 1, CHUNK // 2)
                if line[i : i + CHUNK] in text
            ]
    return found
