"""One root for two clusters (SPEC "Many clusters"), on two real kube-apiservers and
OpenBao: a root rotation moves in lockstep, every cluster checked at every publish
(tests/support/multicluster.py says how).

1. A whole rotation: both clusters hold the two-root bundle and have their control
   planes rolled before either issuer moves to the new root; each cluster's issuer has a
   key of its own; at the end both trust the new root only.
2. east's API server stopped during ``propagating``: the rotation holds, nothing
   activates, the result, status and metrics name east; started again, it completes.
3. A meshed Pod in east still on the one-root bundle holds activation in west too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client import generate_latest

from ca_daemon.model.state import Phase, RootEntry, RootRole, issuer_key
from ca_daemon.pki.bundle import certificate_pem, fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.report.status import clusters_view
from ca_daemon.rotation.issuer_confirmation import issuer_serial
from ca_daemon.rotation.results import PassResult
from ca_daemon.service.metrics import Metrics
from tests.support.cli import ca_daemon
from tests.support.cluster_rotation import HOUR, TRUST_ROOTS, follow_wall_clock
from tests.support.linkerd_identity import IdentityStandIn
from tests.support.multicluster import HOME, LINKED, Daemon, TwoClusters, daemon, make_two_clusters
from tests.support.pki import self_signed_root
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.openbao import OpenBao

pytestmark = pytest.mark.integration

WALL_PASSES = 40  # on the wall clock before activation: 3s propagation at 0.5s a pass
JUMP = 6 * HOUR  # after activation: renewals and retirement (~60h)


def _pass(d: Daemon, ok: bool = True) -> PassResult:
    result = d.engine.reconcile()
    assert not d.observer.failures, d.observer.failures[0]
    if ok:
        assert result.ok, (d.clock.now, result.errors)
    assert result.state is not None
    return result


def _start(
    kube: Kube, kube_b: Kube, openbao: OpenBao, tmp_path: Path, prefix: str, check: LinkerdCheck
) -> tuple[TwoClusters, Daemon, PassResult]:
    two = make_two_clusters(kube, kube_b, openbao, tmp_path, prefix)
    d = daemon(two, check)
    first = _pass(d)
    for name, cluster in two.clusters():
        two.meshes[name].app("web", cluster.bundle_pem(), started=d.clock.now)
    return two, d, first


def _requested(
    kube: Kube, kube_b: Kube, openbao: OpenBao, tmp_path: Path, prefix: str, check: LinkerdCheck
) -> tuple[TwoClusters, Daemon, RootEntry]:
    """_start, then a manual root rotation requested; with the root it replaces."""
    two, d, first = _start(kube, kube_b, openbao, tmp_path, prefix, check)
    assert first.state is not None
    old_root = first.state.ca.active_root
    assert old_root is not None
    d.engine.request_rotation("trust-anchor", "drill")
    return two, d, old_root


def _key(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _propagate(
    two: TwoClusters,
    d: Daemon,
    reinject: set[str],
    passes: int = WALL_PASSES,
    rolled: Callable[[dict[str, list[str]]], None] = lambda pods: None,
) -> PassResult:
    """Passes on the wall clock while propagating: the control planes follow their rolls
    (``rolled`` is told the Pods made, by cluster), and the apps of ``reinject`` clusters
    are re-created with the two-root bundle."""
    done: set[str] = set()
    for _ in range(passes):
        follow_wall_clock(d.clock)
        result = _pass(d)
        assert result.state is not None
        if result.state.ca.phase is not Phase.PROPAGATING:
            return result
        rolled(two.follow_restarts())
        for name in reinject - done:
            bundle = two.cluster(name).bundle_pem()
            if len(parse_pem_certificates(bundle)) == 2:
                two.meshes[name].app("web", bundle, started=d.clock.now)
                done.add(name)
    return result


def _retire(d: Daemon) -> PassResult:
    for _ in range(20):
        d.clock.now += JUMP
        result = _pass(d)
        assert result.state is not None
        if result.state.ca.phase is Phase.STEADY:
            return result
    raise AssertionError(f"never retired: {result.waiting}")


def _roots(two: TwoClusters, name: str) -> list[str]:
    return [fingerprint(r) for r in parse_pem_certificates(two.cluster(name).bundle_pem())]


def test_root_rotation_moves_in_lockstep_across_two_clusters(
    kube: Kube, kube_b: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    two, d, first = _start(kube, kube_b, openbao, tmp_path, "mc", linkerd_check)
    assert first.state is not None
    old_root = first.state.ca.active_root
    assert old_root is not None
    west, east = two.home.issuer_cert(), two.linked.issuer_cert()
    # One root, an issuer per cluster: each its own key, both under the shared root.
    assert _roots(two, HOME) == _roots(two, LINKED) == [fingerprint(old_root.cert)]
    assert directly_issued_by(west, old_root.cert) and directly_issued_by(east, old_root.cert)
    assert _key(west) != _key(east)
    # Kong: each cluster's clients are its own credentials, under the one intermediate.
    west_chains, east_chains = two.home.read_cluster().clients, two.linked.read_cluster().clients
    assert set(west_chains) == set(east_chains) == {"payments", "orders"}
    for name in ("payments", "orders"):
        assert west_chains[name][0] != east_chains[name][0], name
        assert west_chains[name][1] == east_chains[name][1]  # the Kong intermediate
    assert set(two.linked.kong_ca_secrets().values()) == {fingerprint(old_root.cert)}
    assert set(first.state.kong_clients) == {"payments", "orders", "east/payments", "east/orders"}
    assert set(first.state.cluster_issuers) == {LINKED}

    d.engine.request_rotation("trust-anchor", "drill")
    result = _propagate(two, d, reinject={HOME, LINKED})
    assert result.state is not None
    ca = result.state.ca
    assert ca.phase is Phase.RETIRING, (ca.phase, result.waiting)
    new_root = ca.active_root
    assert new_root is not None and new_root.ref != old_root.ref
    # Both issuers moved to the new root in the same pass, each with a new key.
    for name, cluster in two.clusters():
        issuer = cluster.issuer_cert()
        assert directly_issued_by(issuer, new_root.cert), name
        assert _roots(two, name) == [fingerprint(old_root.cert), fingerprint(new_root.cert)]
    assert _key(two.home.issuer_cert()) != _key(two.linked.issuer_cert())
    # Kong trusts both roots in both clusters until the old one retires.
    both = {fingerprint(old_root.cert), fingerprint(new_root.cert)}
    for name, cluster in two.clusters():
        assert set(cluster.kong_ca_secrets().values()) == both, name
    # Both control planes were rolled (after the two-root bundle was everywhere).
    for name, cluster in two.clusters():
        assert all(cluster.restarted_at().values()), name

    done = _retire(d)
    assert _roots(two, HOME) == _roots(two, LINKED) == [fingerprint(new_root.cert)]
    assert done.state is not None
    new_inter = done.state.ca.active_intermediate
    assert new_inter is not None
    for name, cluster in two.clusters():
        assert set(cluster.kong_ca_secrets().values()) == {fingerprint(new_root.cert)}, name
        for client, chain in cluster.read_cluster().clients.items():
            assert chain[1] == new_inter.cert, (name, client)
    assert d.observer.polls > WALL_PASSES // 4
    assert d.observer.linkerd_checks >= 4 * d.observer.polls - 8  # 2 issuers x 2 bundles


def test_an_unreachable_cluster_holds_the_rotation_until_it_answers(
    kube: Kube, kube_b: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    two, d, old_root = _requested(kube, kube_b, openbao, tmp_path, "mcdown", linkerd_check)
    # Until every cluster holds the two-root bundle and the bundle was confirmed.
    for _ in range(WALL_PASSES):
        follow_wall_clock(d.clock)
        result = _pass(d)
        assert result.state is not None
        rotation = result.state.ca.rotation
        if rotation is not None and rotation.confirmed_at is not None:
            break
    else:
        raise AssertionError(f"never confirmed: {result.waiting}")
    two.follow_restarts()
    for name, cluster in two.clusters():
        two.meshes[name].app("web", cluster.bundle_pem(), started=d.clock.now)

    apiserver = kube_b.apiserver
    assert apiserver is not None
    apiserver.stop()
    d.observer.down.add(LINKED)
    try:
        held: list[PassResult] = []
        for _ in range(12):  # 6s on the wall clock: twice the propagation delay
            follow_wall_clock(d.clock)
            held.append(_pass(d, ok=False))
            two.meshes[HOME].follow_restarts(two.home.restarted_at())
        last = held[-1]
        assert last.state is not None
        assert last.state.ca.phase is Phase.PROPAGATING
        assert not any(s.action == "Activate" for r in held for s in r.steps)
        assert directly_issued_by(two.home.issuer_cert(), old_root.cert)
        assert last.waiting is not None and LINKED in last.waiting, last.waiting
        assert any(LINKED in e for e in last.errors), last.errors
        # status and metrics name the cluster.
        views = {v["name"]: v for v in clusters_view(d.settings, last.reports, []) or []}
        assert views[LINKED]["reached"] is False and views[LINKED]["holds_rotation"] is True
        assert views[HOME]["reached"] is True and views[HOME]["holds_rotation"] is None
        metrics = Metrics()
        metrics.observe(last, d.settings, d.clock.now)
        text = generate_latest(metrics.registry).decode()
        assert f'ca_daemon_cluster_holds_root_rotation{{cluster="{LINKED}"}} 1.0' in text
        assert f'ca_daemon_cluster_reached{{cluster="{LINKED}"}} 0.0' in text
        assert f'ca_daemon_cluster_reached{{cluster="{HOME}"}} 1.0' in text
    finally:
        apiserver.start()
        d.observer.down.discard(LINKED)

    result = _propagate(two, d, reinject=set())
    assert result.state is not None
    assert result.state.ca.phase is Phase.RETIRING, result.waiting
    new_root = result.state.ca.active_root
    assert new_root is not None and new_root.ref != old_root.ref
    for name, cluster in two.clusters():
        assert directly_issued_by(cluster.issuer_cert(), new_root.cert), name
    _retire(d)
    assert _roots(two, HOME) == _roots(two, LINKED) == [fingerprint(new_root.cert)]


def test_a_lagging_pod_in_one_cluster_holds_activation_in_the_other(
    kube: Kube, kube_b: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    two, d, old_root = _requested(kube, kube_b, openbao, tmp_path, "mclag", linkerd_check)
    # west's app is re-injected with the two-root bundle; east's keeps the old one.
    result = _propagate(two, d, reinject={HOME}, passes=16)  # 8s: the delay is 3s
    assert result.state is not None
    ca = result.state.ca
    assert ca.phase is Phase.PROPAGATING
    assert ca.root(RootRole.NEXT) is not None
    lagging = two.meshes[LINKED].pods[two.linked.app_ns, "web"]
    assert result.waiting is not None and f"{LINKED}/{lagging}" in result.waiting
    assert ca.rotation is not None and f"{LINKED}/{lagging}" in ca.rotation.pending_pods
    # Nothing moved in west either: its issuer is still under the old root.
    assert directly_issued_by(two.home.issuer_cert(), old_root.cert)
    assert result.state.credential(issuer_key(LINKED)) is not None

    two.meshes[LINKED].app("web", two.linked.bundle_pem(), started=d.clock.now)
    result = _propagate(two, d, reinject=set())
    assert result.state is not None
    assert result.state.ca.phase is Phase.RETIRING, result.waiting


def test_verify_checks_every_cluster_then_that_all_trust_the_same_roots(
    kube: Kube, kube_b: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    two, _, _ = _start(kube, kube_b, openbao, tmp_path, "mcv", linkerd_check)
    run = ["verify", "--config", str(two.config), "--json"]
    before = ca_daemon(*run, cwd=tmp_path)
    doc = json.loads(before.stdout)
    assert before.returncode == 0, doc["findings"]
    assert doc["target"] == "clusters"
    differ = [f for f in doc["findings"] if f["id"] == "clusters-roots-differ"]
    assert differ == [], doc["findings"]
    assert f"clusters {HOME}, {LINKED} trust the same 1 root(s)" in doc["checked"]
    assert any(c.startswith(f"cluster {LINKED}: ") for c in doc["checked"])

    # Someone else's root slipped into east's trust roots (as a hand-run runbook might).
    _, stranger = self_signed_root("stranger")
    path = f"/api/v1/namespaces/{two.linked.linkerd_ns}/configmaps/{TRUST_ROOTS}"
    bundle = two.linked.bundle_pem() + certificate_pem(stranger)
    with kube_b.http() as http:
        http.patch(
            path,
            json={"data": {"ca-bundle.crt": bundle}},
            headers={"Content-Type": "application/merge-patch+json"},
        ).raise_for_status()
    after = ca_daemon(*run, cwd=tmp_path)
    assert after.returncode == 1, after.stdout + after.stderr
    found = [f for f in json.loads(after.stdout)["findings"] if f["id"] == "clusters-roots-differ"]
    assert [f["object"] for f in found] == [f"cluster {LINKED}"]
    assert fingerprint(stranger)[:16] in found[0]["message"]
    # The kubeconfigs given on the command line, in the order of clusters: the same.
    given = ca_daemon(
        *run,
        "--kubeconfig",
        str(tmp_path / "west.kubeconfig"),
        "--kubeconfig",
        str(tmp_path / "east.kubeconfig"),
        cwd=tmp_path,
    )
    assert given.returncode == 1, given.stdout + given.stderr
    ids = [f["id"] for f in json.loads(given.stdout)["findings"]]
    assert ids.count("clusters-roots-differ") == 1


def test_each_cluster_s_identity_controller_confirms_its_own_issuer(
    kube: Kube, kube_b: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    """east asks Linkerd (``confirm: events``): its identity controller, played on east's
    API server, must load east's new issuer before the old root may retire."""
    two = make_two_clusters(
        kube, kube_b, openbao, tmp_path, "mccnf", east_linkerd={"confirm": "events"}
    )
    d = daemon(two, linkerd_check)
    first = _pass(d)
    assert first.state is not None
    noted = first.state.ca.answer(LINKED)
    assert noted is not None and noted.loaded is None
    assert first.state.ca.answer(None) is None  # west does not ask (confirm: none)
    (tmp_path / "east-identity").mkdir()
    identity = IdentityStandIn(
        kube_b,
        two.linked.linkerd_ns,
        linkerd_check,
        tmp_path / "east-identity",
        lambda: d.clock.now,
    )
    follow_wall_clock(d.clock, 1.1)  # its Pod starts a second after the issuer went out
    identity.restart()
    started = _pass(d)
    assert started.state is not None
    loaded = started.state.ca.answer(LINKED)
    assert loaded is not None and loaded.loaded, loaded

    d.engine.request_rotation("trust-anchor", "drill")
    for name, cluster in two.clusters():
        two.meshes[name].app("web", cluster.bundle_pem(), started=d.clock.now)

    def follow_identity(made: dict[str, list[str]]) -> None:
        prefix = f"{two.linked.linkerd_ns}/linkerd-identity-"
        if any(p.startswith(prefix) for p in made[LINKED]):
            identity.restart()  # rolled onto the two-root bundle
        identity.sync()

    result = _propagate(two, d, reinject={HOME, LINKED}, rolled=follow_identity)
    assert result.state is not None
    # Activated, east's new issuer out, not yet loaded there: no retirement.
    assert result.state.ca.phase is Phase.ACTIVATED, result.waiting
    east = result.state.issuer(LINKED)
    assert east is not None
    serial = issuer_serial(east.cert)
    assert result.waiting is not None
    assert f"identity controller in cluster {LINKED} to load issuer {serial}" in result.waiting
    d.clock.now += timedelta(seconds=30)
    assert _pass(d).state.ca.phase is Phase.ACTIVATED  # type: ignore[union-attr]
    assert identity.sync() == "IssuerUpdated"
    retiring = _pass(d)
    assert retiring.state is not None
    assert retiring.state.ca.phase is Phase.RETIRING, retiring.waiting
    answer = retiring.state.ca.answer(LINKED)
    assert answer is not None and (answer.serial, answer.loaded) == (serial, True)
    views = {
        v["name"]: v for v in clusters_view(d.settings, [], [], retiring.state, d.clock.now) or []
    }
    assert views[LINKED]["linkerd_issuer"]["state"] == "loaded"
    metrics = Metrics()
    metrics.observe_state(retiring.state, d.settings, d.clock.now)
    text = generate_latest(metrics.registry).decode()
    assert f'ca_daemon_linkerd_issuer_loaded{{cluster="{LINKED}",serial="{serial}"}} 1.0' in text
