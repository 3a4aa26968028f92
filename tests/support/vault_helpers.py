"""Helpers for tests that run the daemon against the real OpenBao dev server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.cli import ca_daemon
from tests.support.servers.openbao import OpenBao


def vault_config(
    workdir: Path, bao: OpenBao, prefix: str, token: str | None = None, **extra: Any
) -> Path:
    """A config file for the vault anchor with mounts and state path unique to ``prefix``."""
    token_file = workdir / "vault-token"
    token_file.write_text((token or bao.token) + "\n")
    token_file.chmod(0o600)
    vault: dict[str, Any] = {
        "address": bao.address,
        "auth": {"method": "token", "token_file": str(token_file)},
        "root_mount": f"{prefix}-root",
        "kong_mount": f"{prefix}-kong",
        "state_path": f"ca-daemon/{prefix}",
    }
    vault.update(extra.pop("vault", {}))
    config: dict[str, Any] = {
        "anchor": {"backend": "vault", "vault": vault, "local": {"dir": str(workdir / "data")}},
        "publish": {"kubernetes": {"enabled": False}},
        "kong": {
            "clients": [
                {
                    "name": "payments",
                    "common_name": "kong.payments.upstream",
                    "dns_names": ["kong.kong.svc.cluster.local"],
                    "uris": ["spiffe://cluster.local/ns/kong/sa/kong"],
                }
            ]
        },
    }
    config.update(extra)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_daemon(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return ca_daemon(*args, "--config", str(config), cwd=config.parent)


def bao_json(bao: OpenBao, *args: str) -> Any:
    # bao wants flags before the path: `bao kv get -format=json secret/x`.
    result = bao.cli(*args[:-1], "-format=json", args[-1])
    data = json.loads(result.stdout)
    return data


def public_der(key_or_cert: Any) -> bytes:
    public = key_or_cert.public_key()
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def private_keys_in(text: str) -> list[Any]:
    """Every unencrypted PEM private key in ``text``."""
    keys = []
    marker = "-----BEGIN "
    for chunk in text.split(marker)[1:]:
        header = chunk.split("-----", 1)[0]
        if "PRIVATE KEY" not in header or "ENCRYPTED" in header:
            continue
        end = f"-----END {header}-----"
        pem = marker + chunk.split(end, 1)[0] + end + "\n"
        keys.append(serialization.load_pem_private_key(pem.encode(), password=None))
    return keys


def first_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem.encode())[0]


def strings_in(value: Any) -> list[str]:
    """Every string inside a JSON document (PEM blocks stored in Vault KV, say)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []
