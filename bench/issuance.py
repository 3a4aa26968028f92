"""(1) Issuance against real OpenBao: Kong client certificates per second by the daemon's
Vault backend (key, CSR, sign, check, journal record), versus the raw ceiling: the
same number of `sign` calls by a minimal concurrent httpx client straight to OpenBao
with pre-made CSRs (same concurrency as rotation.concurrency).

    .venv/bin/python bench/issuance.py        # BENCH_SIZES=10,100,1000 BENCH_REPEAT=2
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.lib import parallel, repeats, save, servers, sizes
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.rotation.engine import Engine
from tests.support.servers.openbao import OpenBao

CONCURRENCY = 8


def clients(n: int) -> list[dict[str, str]]:
    return [{"name": f"c{i:04d}", "common_name": f"kong.c{i:04d}.upstream"} for i in range(n)]


def vault_settings(wd: Path, bao: OpenBao, prefix: str, n: int, **extra: Any) -> Settings:
    token_file = wd / "vault-token"
    token_file.write_text(bao.token + "\n")
    token_file.chmod(0o600)
    config = {
        "anchor": {
            "backend": "vault",
            "vault": {
                "address": bao.address,
                "auth": {"method": "token", "token_file": str(token_file)},
                "root_mount": f"{prefix}-root",
                "kong_mount": f"{prefix}-kong",
                "state_path": f"ca-daemon/{prefix}",
            },
        },
        "publish": {"kubernetes": {"enabled": False}},
        "rotation": {"concurrency": CONCURRENCY},
        "kong": {"clients": clients(n)},
        **extra,
    }
    path = wd / f"{prefix}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path)


def csrs(n: int) -> list[str]:
    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kong.c{i:04d}.upstream")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        out.append(csr.public_bytes(serialization.Encoding.PEM).decode())
    return out


def raw_sign(bao: OpenBao, mount: str, n: int) -> float:
    """n sign calls with pre-made CSRs, CONCURRENCY at once, one connection pool."""
    pems = csrs(n)
    not_after = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with httpx.Client(
        base_url=bao.address,
        headers={"X-Vault-Token": bao.token},
        timeout=30,
        limits=httpx.Limits(max_connections=CONCURRENCY),
    ) as http:
        (ref,) = http.request("LIST", f"/v1/{mount}/issuers").json()["data"]["keys"]

        def sign(i: int) -> None:
            body = {
                "csr": pems[i],
                "common_name": f"kong.c{i:04d}.upstream",
                "not_after": not_after,
                "exclude_cn_from_sans": True,
                "format": "pem",
            }
            r = http.post(f"/v1/{mount}/issuer/{ref}/sign/kong-client", json=body)
            r.raise_for_status()

        return parallel(sign, n, CONCURRENCY)


def daemon_issue(wd: Path, bao: OpenBao, prefix: str, n: int) -> tuple[float, float]:
    """(seconds, CPU seconds) of the pass that issues n clients; the mounts, root and
    intermediate are made by an earlier pass with no client."""
    setup = vault_settings(wd, bao, prefix, 0)
    anchor, journal = build_anchor_and_journal(setup)
    assert Engine(setup, anchor, journal, []).reconcile().ok
    settings = vault_settings(wd, bao, prefix, n)
    anchor, journal = build_anchor_and_journal(settings)
    engine = Engine(settings, anchor, journal, [])
    cpu, start = time.process_time(), time.perf_counter()
    result = engine.reconcile()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert result.ok, result.errors[:3]
    issued = [s for s in result.steps if s.action == "IssueKongClient" and s.ok]
    assert len(issued) == n, len(issued)
    return seconds, cpu


def main() -> None:
    rows = []
    with servers("issuance", want_kube=False) as (wd, _, bao):
        assert bao is not None
        for n in sizes([10, 100, 1000]):
            for r in range(repeats()):
                prefix = f"b{n}r{r}"
                daemon, cpu = daemon_issue(wd, bao, prefix, n)
                raw = raw_sign(bao, f"{prefix}-kong", n)
                rows.append(
                    {
                        "bench": "issuance",
                        "clients": n,
                        "repeat": r,
                        "daemon_s": round(daemon, 3),
                        "daemon_cpu_s": round(cpu, 3),
                        "daemon_per_s": round(n / daemon, 1),
                        "raw_s": round(raw, 3),
                        "raw_per_s": round(n / raw, 1),
                        "ratio": round(raw / daemon, 3),
                    }
                )
                print(rows[-1], flush=True)
    save("issuance", ".venv/bin/python -m bench.issuance", rows)


if __name__ == "__main__":
    main()
