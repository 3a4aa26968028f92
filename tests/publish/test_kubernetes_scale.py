"""Publishing many Kong clients reads each namespace with one LIST, not one GET per
object: counted by the real kube-apiserver itself (``apiserver_request_total``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.publish import kubernetes as kubernetes_publisher
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.report.rbac import manifests
from ca_daemon.rotation.engine import Engine
from ca_daemon.util.kube import api_client
from tests.support.kube_cluster import await_rbac
from tests.support.servers.kube import READS, WRITES, Kube, api_requests, total
from tests.support.servers.tools import unique

pytestmark = pytest.mark.integration

CLIENTS = 200
NAMESPACES = 4


def test_a_steady_pass_reads_each_namespace_once_and_writes_nothing(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespaces = [unique(f"scale-{i}") for i in range(NAMESPACES)]
    linkerd_ns, kong_ns, sa_ns = (unique(f"scale-{n}") for n in ("linkerd", "kong", "cad"))
    for ns in (*namespaces, linkerd_ns, kong_ns, sa_ns):
        kube.create_namespace(ns)
    clients = []
    for i in range(CLIENTS):
        ns = namespaces[i % NAMESPACES]
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"api-{i:03d}", "namespace": ns},
                # Headless: the test apiserver's service IP range is small.
                "spec": {"clusterIP": "None", "ports": [{"port": 443}]},
            }
        )
        clients.append(
            {
                "name": f"c{i:03d}",
                "common_name": f"kong.c{i:03d}.upstream",
                "service": f"{ns}/api-{i:03d}",
            }
        )
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": True}},
                "linkerd": {"namespace": linkerd_ns},
                "kong": {"namespace": kong_ns, "clients": clients},
            }
        )
    )
    settings = load_settings(config)
    kube.create_service_account(sa_ns, "ca-daemon")
    for doc in manifests(settings, sa_ns, "ca-daemon"):
        kube.apply(doc)
    token = kube.service_account_token(sa_ns, "ca-daemon")
    for ns in namespaces:
        await_rbac(kube, token, f"/api/v1/namespaces/{ns}/secrets", allowed=True)
    anchor, journal = build_anchor_and_journal(settings)
    publisher = KubernetesPublisher(settings, api_client(kube.write_kubeconfig(token)))
    engine = Engine(settings, anchor, journal, [publisher])

    before = api_requests(kube)
    first = engine.reconcile()
    assert first.ok, first.errors[:5]
    created = api_requests(kube) - before
    (report,) = first.reports
    assert report.errors == {}
    # Every write is one changed object: 200 Secrets, their 200 Services annotated, the
    # Kong CA, Linkerd's issuer and trust roots.
    assert len(report.changed) == 2 * CLIENTS + 3
    assert total(created, WRITES) == len(report.changed), created

    before = api_requests(kube)
    steady = engine.reconcile()
    after = api_requests(kube)
    assert steady.ok and steady.reports[0].changed == []
    counts = after - before
    assert total(counts, WRITES) == 0, counts
    # One LIST of Secrets and one of Services per client namespace; by name the one
    # issuer, trust roots and Kong CA; the Kong CA Secrets listed by label. Not ~400.
    reads = total(counts, READS)
    assert reads <= 3 * (NAMESPACES + 2), counts
    assert counts["LIST", "secrets"] >= NAMESPACES, counts
    assert counts["GET", "secrets"] <= 2, counts
    assert counts["GET", "services"] == 0, counts

    # Pages: with 7 objects a page, every namespace's 50 Secrets come in 8 LISTs that
    # follow the continue token; none is missed (and read again by name), none written.
    monkeypatch.setattr(kubernetes_publisher, "_PAGE", 7)
    before = api_requests(kube)
    paged = engine.reconcile()
    counts = api_requests(kube) - before
    assert paged.ok and paged.reports[0].changed == [], paged.errors[:3]
    assert total(counts, WRITES) == 0, counts
    assert counts["LIST", "secrets"] >= NAMESPACES * -(-CLIENTS // NAMESPACES // 7), counts
    assert counts["GET", "secrets"] <= 2, counts
    assert counts["GET", "services"] == 0, counts
