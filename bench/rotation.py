"""(2) Mass rotation end to end and (4a) steady-state API requests, against real
OpenBao and a real kube-apiserver. N Kong clients in up to 10 namespaces (each with
its Service), the Vault anchor, Kubernetes publishing as the least-privilege
ServiceAccount `config rbac` makes. Per size:

- first pass: every client issued from OpenBao and published as a Secret, versus the
  ceilings added up: N raw `sign` calls + N bare Secret creates;
- steady pass: API reads and writes (apiserver_request_total), versus the floor of
  one LIST per (namespace, kind);
- `request_rotation("kong")` + pass until every client Secret holds a new certificate,
  versus N bare Secret updates (PUT) by a minimal concurrent httpx client (8 at once);
  the API writes must equal the changed objects.

    .venv/bin/python -m bench.rotation       # BENCH_SIZES=10,100,1000 BENCH_REPEAT=2
"""

from __future__ import annotations

import base64
import time
from typing import Any

from bench.issuance import CONCURRENCY, raw_sign, vault_settings
from bench.lib import headless_services, parallel, repeats, save, servers, sizes
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.report.rbac import manifests
from ca_daemon.rotation.engine import Engine
from ca_daemon.util.kube import api_client
from tests.support.servers.kube import READS, WRITES, Kube, api_requests, total
from tests.support.servers.openbao import OpenBao

MAX_NAMESPACES = 10


def setup(wd: Any, k: Kube, bao: OpenBao, n: int) -> tuple[Settings, list[str], str]:
    tag = f"n{n}"
    namespaces = [f"{tag}-app{i}" for i in range(min(MAX_NAMESPACES, n))]
    kong_ns, linkerd_ns, sa_ns = f"{tag}-kong", f"{tag}-linkerd", f"{tag}-cad"
    for ns in (*namespaces, kong_ns, linkerd_ns, sa_ns):
        k.create_namespace(ns)
    services = [(namespaces[i % len(namespaces)], f"api-{i:04d}") for i in range(n)]
    headless_services(k, services)
    settings = vault_settings(
        wd,
        bao,
        tag,
        n,
        publish={"kubernetes": {"enabled": True}},
        linkerd={"namespace": linkerd_ns},
        kong={
            "namespace": kong_ns,
            "clients": [
                {
                    "name": f"c{i:04d}",
                    "common_name": f"kong.c{i:04d}.upstream",
                    "service": f"{ns}/{name}",
                }
                for i, (ns, name) in enumerate(services)
            ],
        },
    )
    k.create_service_account(sa_ns, "ca-daemon")
    for doc in manifests(settings, sa_ns, "ca-daemon"):
        k.apply(doc)
    token = k.service_account_token(sa_ns, "ca-daemon", expiration_seconds=7200)
    deadline = time.monotonic() + 30
    with k.http(token=token) as http:
        first = f"/api/v1/namespaces/{namespaces[0]}/secrets/kong-upstream-c0000"
        while http.get(first).status_code == 403:
            assert time.monotonic() < deadline, "RBAC never allowed the daemon"
            time.sleep(0.1)
    return settings, namespaces, token


def client_certs(k: Kube, namespaces: list[str]) -> dict[str, str]:
    out = {}
    with k.http() as http:
        for ns in namespaces:
            items = http.get(
                f"/api/v1/namespaces/{ns}/secrets",
                params={"labelSelector": "app.kubernetes.io/managed-by=ca-daemon"},
            ).json()["items"]
            for s in items:
                out[f"{ns}/{s['metadata']['name']}"] = s["data"]["tls.crt"]
    return out


def raw_secrets(k: Kube, ns: str, n: int, verb: str) -> float:
    """n bare Secret creates (POST) or updates (PUT), 8 at once, one connection pool."""
    payload = base64.b64encode(b"x" * 1800).decode()
    with k.http() as http:

        def one(i: int) -> None:
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"raw-{i:04d}", "namespace": ns},
                "type": "kubernetes.io/tls",
                "data": {"tls.crt": payload, "tls.key": payload},
            }
            if verb == "POST":
                r = http.post(f"/api/v1/namespaces/{ns}/secrets", json=body)
            else:
                body["data"]["tls.crt"] = base64.b64encode(f"{time.time()}".encode()).decode()
                r = http.put(f"/api/v1/namespaces/{ns}/secrets/raw-{i:04d}", json=body)
            r.raise_for_status()

        return parallel(one, n, CONCURRENCY)


def timed(engine: Engine, k: Kube) -> tuple[float, float, Any, Any]:
    before = api_requests(k)
    cpu, start = time.process_time(), time.perf_counter()
    result = engine.reconcile()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert result.ok, result.errors[:3]
    return seconds, cpu, result, api_requests(k) - before


def main() -> None:
    rows: list[dict[str, Any]] = []
    with servers("rotation") as (wd, k, bao):
        assert k is not None and bao is not None
        for n in sizes([10, 100, 1000]):
            settings, namespaces, token = setup(wd, k, bao, n)
            raw_ns = f"n{n}-raw"
            k.create_namespace(raw_ns)
            anchor, journal = build_anchor_and_journal(settings)
            publisher = KubernetesPublisher(settings, api_client(k.write_kubeconfig(token)))
            engine = Engine(settings, anchor, journal, [publisher])

            seconds, cpu, result, counts = timed(engine, k)
            (report,) = result.reports
            raw_create = raw_secrets(k, raw_ns, n, "POST")
            sign = raw_sign(bao, settings.anchor.vault.kong_mount, n)
            rows.append(
                {
                    "bench": "first-issue",
                    "clients": n,
                    "daemon_s": round(seconds, 3),
                    "daemon_cpu_s": round(cpu, 3),
                    "raw_sign_s": round(sign, 3),
                    "raw_create_s": round(raw_create, 3),
                    "ratio": round((sign + raw_create) / seconds, 3),
                    "writes": total(counts, WRITES),
                    "changed": len(report.changed),
                    "writes_per_client": round(total(counts, WRITES) / n, 2),
                }
            )
            print(rows[-1], flush=True)

            for r in range(repeats()):
                _, _, _, counts = timed(engine, k)
                reads, writes = total(counts, READS), total(counts, WRITES)
                # One LIST of Secrets and of Services per namespace; Linkerd's 2, Kong CA.
                floor = 2 * len(namespaces) + 3
                rows.append(
                    {
                        "bench": "steady",
                        "clients": n,
                        "repeat": r,
                        "namespaces": len(namespaces),
                        "reads": reads,
                        "writes": writes,
                        "floor": floor,
                        "ratio": round(floor / max(reads, 1), 3),
                        "by_verb": {f"{v} {res}": c for (v, res), c in sorted(counts.items())},
                    }
                )
                print(rows[-1], flush=True)

            for r in range(repeats()):
                old = client_certs(k, namespaces)
                engine.request_rotation("kong", "bench")
                seconds, cpu, result, counts = timed(engine, k)
                passes = 1
                new = client_certs(k, namespaces)
                while any(new[key] == old[key] for key in old) and passes < 5:
                    more_s, more_cpu, more, more_counts = timed(engine, k)
                    seconds, cpu, passes = seconds + more_s, cpu + more_cpu, passes + 1
                    counts += more_counts
                    result.reports[0].changed += more.reports[0].changed
                    new = client_certs(k, namespaces)
                assert all(new[key] != old[key] for key in old), "not every Secret rotated"
                raw = raw_secrets(k, raw_ns, n, "PUT")
                changed = len(result.reports[0].changed)
                rows.append(
                    {
                        "bench": "rotation",
                        "clients": n,
                        "repeat": r,
                        "passes": passes,
                        "daemon_s": round(seconds, 3),
                        "daemon_cpu_s": round(cpu, 3),
                        "raw_update_s": round(raw, 3),
                        "ratio": round(raw / seconds, 3),
                        "writes": total(counts, WRITES),
                        "changed": changed,
                    }
                )
                print(rows[-1], flush=True)
    save("rotation", ".venv/bin/python -m bench.rotation", rows)


if __name__ == "__main__":
    main()
