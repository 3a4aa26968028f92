"""(3) Root rotation compute time with N Kong clients, configured waits excluded: the
embedded default's parts (local anchor, file journal, directory publisher) on a
simulated clock that jumps two hours per pass, as tests/system/
test_root_rotation_local.py does. The sum of the passes' wall time, versus the raw
ceiling: the same number of EC P-256 keys and certificates made with `cryptography`
directly (what re-issuing every credential under a new root cannot avoid).

    .venv/bin/python -m bench.root            # BENCH_SIZES=10,100,1000 BENCH_REPEAT=2
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.lib import repeats, save, sizes, workdir
from ca_daemon.config.loading import load_settings
from ca_daemon.service.wiring import build_engine

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def raw_issue(n: int) -> float:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raw CA")])
    start = time.perf_counter()
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kong.c{i:04d}.upstream")])
        (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(T0)
            .not_valid_after(T0 + timedelta(days=30))
            .sign(ca_key, hashes.SHA256())
        )
    return time.perf_counter() - start


def daemon_rotation(n: int) -> tuple[float, int]:
    with workdir("root") as wd:
        config = wd / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "anchor": {"local": {"dir": str(wd / "data")}},
                    "publish": {"kubernetes": {"enabled": False}},
                    "rotation": {"propagation_delay": "10m", "clock_skew": "5m"},
                    "root": {"lifetime": "240h", "rotate_before": "120h"},
                    "linkerd": {"issuer": {"lifetime": "48h", "rotate_before": "16h"}},
                    "kong": {
                        "intermediate": {"lifetime": "100h", "rotate_before": "30h"},
                        "clients": [
                            {"name": f"c{i:04d}", "common_name": f"kong.c{i:04d}.upstream"}
                            for i in range(n)
                        ],
                    },
                }
            )
        )
        engine = build_engine(load_settings(config))
        now = T0
        assert engine.reconcile(now=now).ok
        engine.request_rotation("trust-anchor", "bench", now=now)
        spent, passes = 0.0, 0
        while passes < 200:
            now += timedelta(hours=2)
            start = time.perf_counter()
            result = engine.reconcile(now=now)
            spent += time.perf_counter() - start
            passes += 1
            assert result.ok, result.errors[:3]
            record, _ = engine.journal.load_ca()
            if not any(op.open for op in record.operations):
                return spent, passes
        raise AssertionError("root rotation did not finish in 400 simulated hours")


def main() -> None:
    rows = []
    for n in sizes([10, 100, 1000]):
        for r in range(repeats()):
            daemon, passes = daemon_rotation(n)
            raw = raw_issue(n)
            rows.append(
                {
                    "bench": "root",
                    "clients": n,
                    "repeat": r,
                    "passes": passes,
                    "daemon_s": round(daemon, 3),
                    "raw_s": round(raw, 3),
                    "ratio": round(raw / daemon, 3),
                }
            )
            print(rows[-1], flush=True)
    save("root", ".venv/bin/python -m bench.root", rows)


if __name__ == "__main__":
    main()
