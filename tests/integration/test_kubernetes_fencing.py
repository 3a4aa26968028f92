"""Fencing: a writer holding an older journal view never overwrites newer objects.

Every object carries `ca-daemon.io/generation` (CA record version, credential record
version). A deposed leader that resumes with the world it had derived before must be
refused; and a journal write that changes nothing published must not rewrite objects.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ca_daemon.kube import api_client
from ca_daemon.publish.k8s_objects import kong_ca_secret_name
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.world import desired_world
from tests.fixtures.kube import Kube
from tests.integration.test_kubernetes_publish import make_cluster
from tests.unit.conftest import self_signed_root

pytestmark = pytest.mark.integration

GENERATION = "ca-daemon.io/generation"


def test_a_stale_writer_is_refused_and_no_write_is_needless(kube: Kube, tmp_path: Path) -> None:
    c = make_cluster(kube, tmp_path, "fence")
    assert c.run("run", "--once").returncode == 0
    engine = c.engine()
    loaded = engine.journal.load()
    stale = desired_world(
        loaded.state, c.settings, loaded.version, dict(loaded.credential_versions)
    )
    before = c.secret(c.app_ns, "kong-upstream-payments")
    ca_version, cred_version = map(int, before["metadata"]["annotations"][GENERATION].split("."))
    assert (ca_version, cred_version) == (
        loaded.version,
        loaded.credential_versions["kong/payments"],
    )

    trust_roots = f"/api/v1/namespaces/{c.linkerd_ns}/configmaps/linkerd-identity-trust-roots"
    issuer = f"/api/v1/namespaces/{c.linkerd_ns}/secrets/linkerd-identity-issuer"
    unrelated = {path: c.get(path)["metadata"]["resourceVersion"] for path in (trust_roots, issuer)}

    # The current leader renews the client: its record (and so the object) moves on.
    engine.request_rotation("kong/payments", "test")
    assert engine.reconcile().ok
    assert engine.journal.load_ca()[1] > loaded.version  # the request was journaled
    # The CA record's version moved, but that alone is no reason to rewrite an object.
    for path, version in unrelated.items():
        assert c.get(path)["metadata"]["resourceVersion"] == version, path
    renewed = c.secret(c.app_ns, "kong-upstream-payments")
    assert renewed["data"]["tls.crt"] != before["data"]["tls.crt"]
    untouched = c.secret(c.kong_ns, "kong-upstream-orders")

    # A deposed leader resumes and publishes what it had derived before.
    deposed = KubernetesPublisher(c.settings, api_client(c.kubeconfig))
    report = deposed.publish(stale)
    ref = f"secret/{c.app_ns}/kong-upstream-payments"
    assert "newer than this pass's" in report.errors[ref]
    after = c.secret(c.app_ns, "kong-upstream-payments")
    assert after["metadata"]["resourceVersion"] == renewed["metadata"]["resourceVersion"]
    assert after["data"] == renewed["data"]
    # What it would not change anyway is left alone too (same content, no write).
    orders = c.secret(c.kong_ns, "kong-upstream-orders")
    assert orders["metadata"]["resourceVersion"] == untouched["metadata"]["resourceVersion"]


def test_a_stale_writer_does_not_delete_a_newer_root_s_kong_ca(kube: Kube, tmp_path: Path) -> None:
    c = make_cluster(kube, tmp_path, "fenceca")
    assert c.run("run", "--once").returncode == 0
    loaded = c.engine().journal.load()
    stale = desired_world(
        loaded.state, c.settings, loaded.version, dict(loaded.credential_versions)
    )
    # A newer writer (the leader, mid-rotation) publishes a second root's Kong CA Secret.
    _, next_root = self_signed_root("next", now=datetime.now(UTC))
    newer = replace(stale, roots=(*stale.roots, next_root), generation=loaded.version + 3)
    publisher = KubernetesPublisher(c.settings, api_client(c.kubeconfig))
    assert publisher.publish(newer).errors == {}
    name = kong_ca_secret_name(next_root)
    assert c.secret(c.kong_ns, name) is not None
    # The stale writer's world lacks that root: it must leave the Secret alone, and say so.
    report = KubernetesPublisher(c.settings, api_client(c.kubeconfig)).publish(stale)
    assert "not deleting it" in report.errors[f"secret/{c.kong_ns}/{name}"]
    assert c.secret(c.kong_ns, name) is not None
