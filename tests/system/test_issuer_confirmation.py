"""Linkerd's identity controller confirms each issuer, and a root rotation waits for it.

On real OpenBao and the real kube-apiserver, the daemon in-process as its ServiceAccount
(tests/support/cluster_rotation.py), with ``linkerd.confirm: events``. Linkerd's identity
controller is played by tests/support/linkerd_identity.py: it reads its trust anchors
only when it (re)starts and answers each issuer change with the Event Linkerd records,
deciding with Linkerd's own checks (tests/linkerd-check).

1. A rotation whose new issuer the identity controller loads retires: it waits in
   ``activated`` until the ``IssuerUpdated`` Event, then starts retiring. (The first
   issuer is confirmed by the identity Pod that started after it: no Event at start.)
2. An identity controller that was not restarted onto the two-root bundle refuses the new
   issuer (``IssuerUpdateSkipped``): retirement never starts, status says why, the metric
   the alert reads is 1 and the daemon records a Warning Event; a restart of the identity
   controller confirms it, and the rotation goes on.
3. A renewed issuer with no answer is reported once ``linkerd.confirm_timeout`` passed.
4. An issuer that went out before ca-daemon asked Linkerd (an upgrade) is taken as loaded.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from ca_daemon.journal.journal import Seen
from ca_daemon.model.state import Phase
from ca_daemon.publish.linkerd_rollout import ISSUER_REASON
from ca_daemon.publish.pods_gate import issuer_event_name
from ca_daemon.report.status import status_view, warnings
from ca_daemon.rotation.issuer_confirmation import issuer_serial
from ca_daemon.rotation.results import PassResult
from ca_daemon.service.metrics import Metrics
from tests.support.cluster_rotation import (
    HOUR,
    Daemon,
    Mesh,
    RotationCluster,
    VaultAdmin,
    daemon,
    follow_wall_clock,
    make_rotation_cluster,
)
from tests.support.identity_controller import DEPLOYMENT
from tests.support.linkerd_identity import ISSUER_SECRET, IdentityStandIn
from tests.support.metrics_exposition import values
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.openbao import OpenBao

pytestmark = pytest.mark.integration

WALL_PASSES = 40
JUMP = 6 * HOUR


def _pass(d: Daemon) -> PassResult:
    result = d.engine.reconcile()
    assert result.ok, (d.clock.now, result.errors)
    assert result.state is not None
    return result


def _metric(d: Daemon, result: PassResult, name: str, **labels: str) -> float:
    metrics = Metrics()
    assert result.state is not None
    metrics.observe_state(result.state, d.engine.settings, d.clock.now)
    found = values(metrics, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0]


def _start(
    kube: Kube, openbao: OpenBao, workdir: Path, prefix: str, linkerd_check: LinkerdCheck
) -> tuple[RotationCluster, Daemon, Mesh, IdentityStandIn]:
    cluster = make_rotation_cluster(
        kube, VaultAdmin(openbao.address, openbao.token), workdir, prefix, confirm="events"
    )
    d = daemon(cluster, linkerd_check)
    mesh = Mesh(kube, cluster.linkerd_ns, cluster.app_ns)
    mesh.control_plane(started=d.clock.now - HOUR)
    first = _pass(d)
    assert first.state is not None and first.state.linkerd_issuer is not None
    noted = first.state.ca.issuer_answer  # out in the cluster, nothing heard yet
    assert noted is not None and noted.loaded is None
    assert noted.serial == issuer_serial(first.state.linkerd_issuer.cert)
    identity = IdentityStandIn(
        kube, cluster.linkerd_ns, linkerd_check, workdir, lambda: d.clock.now
    )
    follow_wall_clock(d.clock, 1.1)  # the identity Pod starts a second after the issuer
    identity.restart()
    confirmed = _pass(d)
    assert confirmed.state is not None
    answer = confirmed.state.ca.issuer_answer
    assert answer is not None and answer.loaded, answer
    assert answer.message == "identity controller started with it"
    return cluster, d, mesh, identity


def _activate(
    c: RotationCluster, d: Daemon, mesh: Mesh, identity: IdentityStandIn, restart: bool
) -> PassResult:
    """Request a rotation and pass on the wall clock until it activated; the identity
    controller restarts with its Deployment's roll when ``restart``."""
    d.engine.request_rotation("trust-anchor", "drill")
    for _ in range(WALL_PASSES):
        follow_wall_clock(d.clock)
        result = _pass(d)
        assert result.state is not None
        if result.state.ca.phase is Phase.ACTIVATED:
            return result
        replaced = mesh.follow_restarts(c.restarted_at())
        if restart and any(p.startswith(f"{c.linkerd_ns}/{DEPLOYMENT}-") for p in replaced):
            identity.restart()
        # The kubelet delivers the issuer Secret's new ca.crt: Linkerd reloads the old issuer
        # and says IssuerUpdated, which must not count for the issuer activation publishes.
        identity.sync()
    raise AssertionError(f"not activated after {WALL_PASSES} passes: {result.waiting}")


def test_a_confirmed_issuer_lets_the_rotation_retire(
    kube: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    c, d, mesh, identity = _start(kube, openbao, tmp_path, "cnfok", linkerd_check)
    activated = _activate(c, d, mesh, identity, restart=True)
    assert identity.restarts == 2  # started, then rolled onto the two-root bundle
    assert activated.state is not None
    serial = issuer_serial(c.issuer_cert())
    assert activated.state.linkerd_issuer is not None
    assert issuer_serial(activated.state.linkerd_issuer.cert) == serial
    assert "IssuerUpdated" in [e["reason"] for e in identity.events]  # the old one's reload
    out = activated.state.ca.issuer_answer
    assert out is not None and out.serial == serial and out.loaded is None
    # Published, not yet confirmed: no retirement, whatever the clock says.
    for _ in range(2):
        d.clock.now += timedelta(seconds=30)
        waiting = _pass(d)
        assert waiting.state is not None and waiting.state.ca.phase is Phase.ACTIVATED
        assert waiting.waiting == (
            f"waiting for Linkerd's identity controller to load issuer {serial} "
            f"(in the cluster since {out.published_at:%Y-%m-%dT%H:%M:%SZ})"
        )
    assert identity.sync() == "IssuerUpdated"
    retiring = _pass(d)
    assert retiring.state is not None
    assert retiring.state.ca.phase is Phase.RETIRING, retiring.waiting
    answer = retiring.state.ca.issuer_answer
    assert answer is not None and (answer.serial, answer.loaded) == (serial, True)
    view = status_view(retiring.state, d.engine.settings, d.clock.now)
    assert view["linkerd_issuer"]["state"] == "loaded"
    assert view["linkerd_issuer"]["text"].startswith(f"Linkerd loaded issuer {serial} at ")
    assert _metric(d, retiring, "ca_daemon_linkerd_issuer_loaded", serial=serial) == 1
    # And on to steady, on time.
    for _ in range(20):
        d.clock.now += JUMP
        identity.sync()  # renewals on the way are loaded too
        done = _pass(d)
        assert done.state is not None
        if done.state.ca.phase is Phase.STEADY:
            break
    else:
        raise AssertionError(f"never retired: {done.waiting}")


def test_a_refused_issuer_holds_retirement_until_linkerd_loads_it(
    kube: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    c, d, mesh, identity = _start(kube, openbao, tmp_path, "cnfno", linkerd_check)
    # The control plane is rolled, but this identity controller keeps running: it still
    # trusts only the old root.
    activated = _activate(c, d, mesh, identity, restart=False)
    assert activated.state is not None
    serial = issuer_serial(c.issuer_cert())
    assert identity.sync() == "IssuerUpdateSkipped"
    linkerd_said = identity.events[-1]["message"]
    assert linkerd_said.startswith(
        "Skipping issuer update as certs could not be read from disk: "
    ), linkerd_said
    assert "x509" in linkerd_said, linkerd_said  # Linkerd's verification error, verbatim

    for _ in range(3):  # hours go by: retirement never starts
        held = _pass(d)
        assert held.state is not None and held.state.ca.phase is Phase.ACTIVATED
        assert held.waiting == (
            f"Linkerd's identity controller refused issuer {serial}: {linkerd_said}"
        )
        d.clock.now += JUMP
    state = held.state
    assert state is not None
    answer = state.ca.issuer_answer
    assert answer is not None and (answer.serial, answer.loaded) == (serial, False)
    view = status_view(state, d.engine.settings, d.clock.now)
    assert view["linkerd_issuer"]["state"] == "refused"
    assert f"Linkerd refused issuer {serial}: {linkerd_said}" in warnings(
        state, d.engine.settings, d.clock.now
    )
    assert _metric(d, held, "ca_daemon_linkerd_issuer_problem", reason="refused") == 1
    assert _metric(d, held, "ca_daemon_linkerd_issuer_loaded", serial=serial) == 0
    event = c.get(f"/api/v1/namespaces/{c.linkerd_ns}/events/{issuer_event_name(ISSUER_SECRET)}")
    assert event is not None and event["type"] == "Warning", event
    assert event["reason"] == ISSUER_REASON
    assert event["message"] == f"Linkerd refused issuer {serial}: {linkerd_said}"
    assert event["involvedObject"]["kind"] == "Secret"

    # The operator restarts the identity controller: it starts with both roots and loads
    # the new issuer from disk (no Event at start); the rotation goes on.
    identity.restart()
    resumed = _pass(d)
    assert resumed.state is not None
    assert resumed.state.ca.phase is Phase.RETIRING, resumed.waiting
    assert _metric(d, resumed, "ca_daemon_linkerd_issuer_problem", reason="refused") == 0


def test_a_renewed_issuer_with_no_answer_is_reported_after_the_timeout(
    kube: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    c, d, _, identity = _start(kube, openbao, tmp_path, "cnfto", linkerd_check)
    timeout = d.engine.settings.linkerd.confirm_timeout
    d.clock.now += timedelta(hours=33)  # the issuer (48h, rotate_before 16h) is due
    renewed = _pass(d)
    assert renewed.state is not None and renewed.state.linkerd_issuer is not None
    serial = issuer_serial(renewed.state.linkerd_issuer.cert)
    assert serial == issuer_serial(c.issuer_cert())
    d.clock.now += timeout / 2
    quiet = _pass(d)
    assert _metric(d, quiet, "ca_daemon_linkerd_issuer_problem", reason="overdue") == 0
    assert _metric(d, quiet, "ca_daemon_linkerd_issuer_unconfirmed_seconds", serial=serial) > 0
    d.clock.now += timeout
    overdue = _pass(d)
    assert overdue.state is not None
    assert _metric(d, overdue, "ca_daemon_linkerd_issuer_problem", reason="overdue") == 1
    said = [w for w in warnings(overdue.state, d.engine.settings, d.clock.now) if serial in w]
    assert said and said[0].startswith(f"no answer from Linkerd about issuer {serial} after")
    event = c.get(f"/api/v1/namespaces/{c.linkerd_ns}/events/{issuer_event_name(ISSUER_SECRET)}")
    assert event is not None and event["message"].startswith(
        f"no answer from Linkerd about issuer {serial}"
    ), event
    # The kubelet delivers it at last: loaded, nothing reported any more.
    assert identity.sync() == "IssuerUpdated"
    loaded = _pass(d)
    assert _metric(d, loaded, "ca_daemon_linkerd_issuer_problem", reason="overdue") == 0
    assert _metric(d, loaded, "ca_daemon_linkerd_issuer_loaded", serial=serial) == 1


def test_an_issuer_published_before_ca_daemon_asked_linkerd_is_taken_as_loaded(
    kube: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    """After an upgrade the journal has no record of the issuer going out, and Linkerd's
    Events about it expired long ago: it is not reported, and not asked about."""
    _, d, _, _ = _start(kube, openbao, tmp_path, "cnfup", linkerd_check)
    record, version = d.engine.journal.load_ca()
    d.engine.journal.record_ca(Seen(version, {}, {}), replace(record, issuer_answer=None))
    d.clock.now += HOUR
    upgraded = _pass(d)
    assert upgraded.state is not None
    answer = upgraded.state.ca.issuer_answer
    assert answer is not None and answer.loaded, answer
    assert answer.message == "already published: not asked"
    assert _metric(d, upgraded, "ca_daemon_linkerd_issuer_problem", reason="overdue") == 0
