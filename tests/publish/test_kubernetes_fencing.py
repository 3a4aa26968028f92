"""Fencing: a writer holding an older journal view never overwrites newer objects.

Every object carries `ca-daemon.io/generation` (journal epoch, CA record version,
credential record version). A deposed leader that resumes with the world it had derived
before must be refused; and a journal write that changes nothing published must not
rewrite objects. Store versions that restart (a re-created credential record, a journal
rebuilt after a loss) must not lock the daemon out of its own objects, and what the
journal says was published survives the process that published it (drift after a
failover).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ca_daemon.journal.format import shard_of
from ca_daemon.model.world import desired_world
from ca_daemon.publish.k8s_objects import kong_ca_secret_name
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.util.kube import api_client
from tests.support.kube_cluster import make_cluster
from tests.support.pki import self_signed_root
from tests.support.servers.kube import Kube

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
    epoch, ca_version, cred_version = map(
        int, before["metadata"]["annotations"][GENERATION].split(".")
    )
    assert (epoch, cred_version) == (0, loaded.credential_versions["kong/payments"])
    # Published from the version before the journal noted that publish (published_at).
    assert ca_version == loaded.version - 1 and loaded.state.ca.published_at is not None

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


def _generation(obj: Any) -> tuple[int, ...]:
    return tuple(int(p) for p in obj["metadata"]["annotations"][GENERATION].split("."))


def test_a_re_created_credential_record_is_not_locked_out(kube: Kube, tmp_path: Path) -> None:
    """A credential record made anew restarts at version 1 (here: the record removed, as
    docs/recovery.md advises for a corrupt one); its Secret carries a higher credential
    version from the old record, and must still be updated."""
    c = make_cluster(kube, tmp_path, "recreate")
    engine = c.engine()
    for _ in range(3):  # move the record's version on: 3 renewals
        engine.request_rotation("kong/payments", "test")
        assert engine.reconcile().ok
    # Someone edits the Secret; the repair rewrites it from the journal as it is now, so
    # it carries the journal's current CA version (nothing new to note after that).
    path = f"/api/v1/namespaces/{c.app_ns}/secrets/kong-upstream-payments"
    with c.kube.http() as http:
        edited = http.patch(
            path,
            json={"data": {"tls.crt": "bm90IGEgY2VydGlmaWNhdGU="}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert edited.status_code == 200, edited.text
    assert engine.reconcile().ok
    before = c.secret(c.app_ns, "kong-upstream-payments")
    assert _generation(before)[1] == engine.journal.load_ca()[1]
    assert _generation(before)[2] >= 3
    engine.journal.store.delete(shard_of("kong/payments"))

    result = engine.reconcile()
    assert result.ok, result.errors
    after = c.secret(c.app_ns, "kong-upstream-payments")
    assert after["data"]["tls.crt"] != before["data"]["tls.crt"]  # the new certificate is out
    assert engine.journal.load().credential_versions["kong/payments"] == 1
    assert _generation(after) > _generation(before)


def test_a_rebuilt_journal_s_new_epoch_outranks_higher_versions(kube: Kube, tmp_path: Path) -> None:
    """A journal rebuilt after a loss may count versions from 1 again (a Vault KV secret
    deleted with its metadata): its new epoch makes it newer than everything before."""
    c = make_cluster(kube, tmp_path, "epoch")
    assert c.run("run", "--once").returncode == 0
    loaded = c.engine().journal.load()
    world = desired_world(loaded.state, c.settings, loaded.version, loaded.credential_versions)
    publisher = KubernetesPublisher(c.settings, api_client(c.kubeconfig))
    # Before the loss, the journal had gone far (version 90 everywhere).
    high = replace(world, generation=90, versions=dict.fromkeys(world.versions, 90))
    _, fresh_root = self_signed_root("rebuilt", now=datetime.now(UTC))
    assert publisher.publish(replace(high, roots=(*high.roots, fresh_root))).errors == {}
    # Rebuilt: versions 1, a new epoch, a different bundle to publish.
    rebuilt = replace(world, generation=1, versions=dict.fromkeys(world.versions, 1), epoch=7)
    report = publisher.publish(rebuilt)
    assert report.errors == {}, report.errors
    trust_roots = c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots")
    assert _generation(trust_roots) == (7, 1, 0)
    assert trust_roots["data"]["ca-bundle.crt"] == rebuilt.bundle_pem
    # And the world from before the loss, resumed by a stale writer, is refused again.
    report = KubernetesPublisher(c.settings, api_client(c.kubeconfig)).publish(high)
    assert any("newer than this pass's" in e for e in report.errors.values()), report.errors


def test_a_deletion_is_drift_for_the_next_leader_too(kube: Kube, tmp_path: Path) -> None:
    """The journal notes what a full publish carried, so a replica that never published an
    object itself still reports it deleted (drift) rather than silently recreating it."""
    c = make_cluster(kube, tmp_path, "driftfo")
    assert c.run("run", "--once").returncode == 0  # another process published everything
    with c.kube.http() as http:
        deleted = http.delete(f"/api/v1/namespaces/{c.app_ns}/secrets/kong-upstream-payments")
        assert deleted.status_code == 200
    result = c.engine().reconcile()  # a fresh process: nothing in its memory
    assert result.ok, result.errors
    drifted = [d for r in result.reports for d in r.drifted]
    assert f"secret/{c.app_ns}/kong-upstream-payments (deleted)" in drifted
    assert c.secret(c.app_ns, "kong-upstream-payments") is not None
