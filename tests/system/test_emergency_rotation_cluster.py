"""An emergency root rotation on real OpenBao and the real kube-apiserver.

A key leaked: the old root must leave every bundle as soon as nothing under it is in
use, not when everything it signed has expired. Three rolls of the whole data plane,
each after every publisher confirmed its bundle: the two-root bundle (then activation),
the same once everything is re-issued (every proxy then restarts under the new issuer),
and the bundle without the old root (then retirement). The test plays the kubelet and
the controllers (``Mesh``, see tests/support/cluster_rotation.py): a rolled Deployment
gets a new Pod a second later, injected with the bundle the trust-roots ConfigMap holds.
The invariants and Linkerd's validation are checked after every publish.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ca_daemon.model.state import OpState, Phase
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import verify_ca_under_roots
from ca_daemon.publish.linkerd_rollout import PENDING_REASON
from ca_daemon.rotation.results import PassResult
from ca_daemon.service.metrics import Metrics
from ca_daemon.service.service import DaemonService
from tests.support.cluster_rotation import (
    HOUR,
    LINKERD_DEPLOYMENTS,
    Daemon,
    Mesh,
    RotationCluster,
    VaultAdmin,
    daemon,
    follow_wall_clock,
    make_rotation_cluster,
    parse_stamp,
)
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.openbao import OpenBao

pytestmark = pytest.mark.integration

APPS = ("web", "api", "billing")
PASSES = 120  # on the wall clock at 0.5 s a pass: a 3 s delay and three rolls fit well inside


def _start(
    kube: Kube, openbao: OpenBao, workdir: Path, prefix: str, linkerd_check: LinkerdCheck
) -> tuple[RotationCluster, Daemon, Mesh]:
    cluster = make_rotation_cluster(
        kube, VaultAdmin(openbao.address, openbao.token), workdir, prefix
    )
    d = daemon(cluster, linkerd_check)

    def on_proof() -> bool:
        record, _ = d.engine.journal.load_ca()
        return record.rotation is not None and record.rotation.proof

    d.checked.on_proof = on_proof
    mesh = Mesh(kube, cluster.linkerd_ns, cluster.app_ns)
    mesh.control_plane(started=d.clock.now - HOUR)
    first = d.engine.reconcile()
    assert first.ok, first.errors
    for app in APPS:
        mesh.app(app, cluster.bundle_pem(), started=d.clock.now)
    return cluster, d, mesh


def _pass(
    c: RotationCluster, d: Daemon, mesh: Mesh, stuck: Callable[[], frozenset[str]] = frozenset
) -> PassResult:
    follow_wall_clock(d.clock)
    result = d.engine.reconcile()
    assert result.ok, (d.clock.now, result.errors)
    assert result.state is not None
    # What Kubernetes does meanwhile: every rolled Deployment gets a new Pod, but for the
    # apps ``stuck`` names (asked now: the pass may just have rolled again).
    mesh.follow_restarts(c.restarted_at())
    mesh.follow_app_restarts(c.bundle_pem(), stuck())
    return result


def _bundle(c: RotationCluster) -> list[str]:
    return [fingerprint(r) for r in parse_pem_certificates(c.bundle_pem())]


def test_an_emergency_retires_the_old_root_once_every_pod_restarted_twice(
    kube: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    c, d, mesh = _start(kube, openbao, tmp_path, "emerg", linkerd_check)
    state = d.engine.journal.load().state
    old_root = state.ca.active_root
    assert old_root is not None
    leaked = c.issuer_cert()
    # The daemon runs with linkerd.restart: control-plane; an emergency rolls it all.
    assert c.settings.linkerd.restart == "control-plane"
    dry = DaemonService(c.settings, d.engine, Metrics(), d.clock).dry_run(
        "trust-anchor", "issuer key leaked", emergency=True
    )
    pods_before = sorted(mesh.pods.values())
    op_id = d.engine.request_rotation("trust-anchor", "issuer key leaked", emergency=True)
    phases: list[Phase] = []
    for _ in range(PASSES):
        result = _pass(c, d, mesh)
        assert result.state is not None
        phases.append(result.state.ca.phase)
        op = result.state.ca.operation(op_id)
        assert op is not None
        if not op.open:
            break
    else:
        raise AssertionError(f"the emergency did not end in {PASSES} passes: {result.waiting}")
    assert op.state is OpState.SUCCEEDED, op
    compressed = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] is not p]
    assert compressed[0] is Phase.PROPAGATING and compressed[-1] is Phase.STEADY
    assert {Phase.ACTIVATED, Phase.RETIRING} <= set(compressed)

    # Three rolls, each of the control plane and every meshed app, each after the
    # confirmation of its stage (journaled before it).
    rolls = d.rollout.restarts
    assert len(rolls) == 3, rolls
    for roll in rolls:
        assert roll.confirmed_at is not None and roll.at >= roll.confirmed_at
        assert {f"deployment/{c.linkerd_ns}/{n}" for n in LINKERD_DEPLOYMENTS} <= set(roll.rolled)
        assert {f"deployment/{c.app_ns}/{a}" for a in APPS} <= set(roll.rolled)
    assert rolls[0].at < rolls[1].at < rolls[2].at
    # The dry run said so: the workloads of each roll, three rolls, the Pods it waits for
    # and the objects it writes.
    assert dry["rolls"] == {"scope": "all", "times": 3, "workloads": sorted(rolls[0].rolled)}
    assert all(sorted(r.rolled) == dry["rolls"]["workloads"] for r in rolls)
    assert dry["pods"] == pods_before
    assert f"configmap/{c.linkerd_ns}/linkerd-identity-trust-roots" in dry["objects"]

    # Gone from every bundle, while what the leaked issuer signed would still be valid.
    new_root = d.engine.journal.load().state.ca.active_root
    assert new_root is not None and new_root.ref != old_root.ref
    assert _bundle(c) == [fingerprint(new_root.cert)]
    assert set(c.kong_ca_secrets().values()) == {fingerprint(new_root.cert)}
    roots = parse_pem_certificates(c.bundle_pem())
    assert verify_ca_under_roots(leaked, roots, d.clock.now)  # refused
    assert leaked.not_valid_after_utc > d.clock.now + HOUR
    # Every meshed app Pod started after the last roll, injected with the new root alone.
    for ns_name in mesh.pods.values():
        ns, name = ns_name.split("/")
        pod = c.get(f"/api/v1/namespaces/{ns}/pods/{name}")
        started = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
        assert parse_stamp(started) > rolls[2].at, ns_name
    assert d.checked.checks > 0 and len(d.checked.linkerd_outputs) == d.checked.checks


def test_a_pod_that_never_restarts_holds_the_emergency_at_the_gate(
    kube: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    c, d, mesh = _start(kube, openbao, tmp_path, "emstuck", linkerd_check)
    old_fp = _bundle(c)[0]
    op_id = d.engine.request_rotation("trust-anchor", "kong client key leaked", emergency=True)
    metrics = Metrics()
    value = metrics.registry.get_sample_value

    # The first roll restarts billing too; from the second on, its new Pod never starts.
    def billing_from_the_second_roll() -> frozenset[str]:
        return frozenset({"billing"}) if len(d.rollout.restarts) > 1 else frozenset()

    for _ in range(PASSES):
        result = _pass(c, d, mesh, billing_from_the_second_roll)
        assert result.state is not None
        if result.state.ca.phase is Phase.ACTIVATED and result.pending_pods:
            break
    else:
        raise AssertionError(f"never held at the gate: {result.waiting}")
    laggard = mesh.pods[c.app_ns, "billing"]
    for _ in range(4):
        result = _pass(c, d, mesh, billing_from_the_second_roll)
        assert result.state is not None and result.state.ca.rotation is not None
        metrics.observe(result, c.settings, d.clock.now)
        assert result.state.ca.phase is Phase.ACTIVATED
        assert result.pending_pods == (laggard,)
        assert result.waiting is not None and laggard in result.waiting
        assert result.state.ca.rotation.pending_pods == (laggard,)  # status shows it
        assert value("ca_daemon_root_rotation_pending_pods") == 1
        assert value("ca_daemon_root_rotation_emergency", {"stage": "2"}) == 1
        assert old_fp in _bundle(c)  # nothing retired under it
    events = c.get(f"/api/v1/namespaces/{c.linkerd_ns}/events")["items"]
    (event,) = [e for e in events if e["reason"] == PENDING_REASON]
    assert laggard in event["message"] and "must be restarted" in event["message"]

    # Its new Pod starts at last: the emergency ends.
    for _ in range(PASSES):
        result = _pass(c, d, mesh)  # billing's new Pod starts now, from the held roll
        assert result.state is not None
        op = result.state.ca.operation(op_id)
        assert op is not None
        if not op.open:
            break
    else:
        raise AssertionError(f"did not end once the Pod restarted: {result.waiting}")
    assert op.state is OpState.SUCCEEDED
    assert old_fp not in _bundle(c)
