"""SIGKILL ``ca-daemon run`` serving two clusters in the middle of a root rotation, then
restart it: the rotation completes in both (SPEC "Many clusters"; "Bad input ... loses
nothing").

The daemon is the real CLI process on the two real kube-apiservers and OpenBao
(tests/support/multicluster.py), with a pass every second, a 3-second propagation delay
and ``rotation.retire_delay: 5s`` so that the whole rotation ends in real time. It is
killed once ``propagating`` and once ``retiring``, and started again on the same journal
each time. Throughout, the test polls both clusters and checks what they show (the
invariants across both clusters' bundles, and Linkerd's validation of each issuer under
both bundles), plays the clusters' controllers (rolled Deployments get new Pods, the
apps are re-injected with the two-root bundle), and at the end finds one new root in
both clusters, both issuers under it, the operation succeeded and no extra root made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.model.state import CaRecord, OpState, Phase
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.rotation.engine import Engine
from tests.support.cli import DaemonProcess
from tests.support.cluster_rotation import (
    HOUR,
    TRUST_ROOTS,
    VAULT_BACKDATE,
    RotationCluster,
    wall_clock,
)
from tests.support.invariants import InvariantChecker
from tests.support.multicluster import HOME, LINKED, Observer, TwoClusters, make_two_clusters
from tests.support.rotation_harness import Clock
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import log_tail

pytestmark = pytest.mark.integration

POLL = 0.3
PHASE_TIMEOUT = 60.0
PROPAGATION = timedelta(seconds=3)
# Snapshots are polled, and X.509 times have whole seconds: a root is seen in every bundle
# up to a poll late, and a signing time read back from not-before up to a second early.
TOLERANCE = timedelta(seconds=1.5)


def _published(cluster: RotationCluster) -> bool:
    """Both the trust roots and the issuer are out in ``cluster`` (a first pass writes
    them side by side, so one may be there before the other)."""
    roots = f"/api/v1/namespaces/{cluster.linkerd_ns}/configmaps/{TRUST_ROOTS}"
    return cluster.get(roots) is not None and cluster.issuer_cert_or_none() is not None


class Drill:
    def __init__(self, two: TwoClusters, linkerd_check: LinkerdCheck, workdir: Path) -> None:
        self.two = two
        self.daemon = DaemonProcess(two.config, workdir / "daemon.log")
        settings = two.settings
        _, self.journal = build_anchor_and_journal(settings)
        self.clock = Clock(wall_clock())
        checker = InvariantChecker(PROPAGATION - TOLERANCE, VAULT_BACKDATE)
        self.observer = Observer(two, self.clock, linkerd_check, checker, retire_early=True)
        self.reinjected: set[str] = set()

    def poll(self) -> CaRecord:
        """One look: play the controllers, check both clusters, read the journal."""
        self.daemon.alive()
        self.clock.now = wall_clock()
        self.two.follow_restarts()
        for name, cluster in self.two.clusters():
            if not _published(cluster):
                continue
            bundle = cluster.bundle_pem()
            if name not in self.reinjected and len(parse_pem_certificates(bundle)) == 2:
                self.two.meshes[name].app("web", bundle, started=self.clock.now)
                self.reinjected.add(name)
        if all(_published(c) for _, c in self.two.clusters()):
            self.observer.publish(None)
            assert not self.observer.failures, self.observer.failures[0]
        record, _ = self.journal.load_ca()
        return record

    def until(self, what: str, done: Callable[[CaRecord], bool]) -> CaRecord:
        deadline = time.monotonic() + PHASE_TIMEOUT
        while time.monotonic() < deadline:
            record = self.poll()
            if done(record):
                return record
            time.sleep(POLL)
        log = log_tail(self.daemon.log)
        raise AssertionError(f"never {what}: phase {record.phase}\n{log}")


def test_kill_9_mid_rotation_across_two_clusters_then_restart(
    kube: Kube, kube_b: Kube, openbao: OpenBao, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    two = make_two_clusters(
        kube,
        kube_b,
        openbao,
        tmp_path,
        "mckill",
        rotation={
            "propagation_delay": "3s",
            "clock_skew": "5m",
            "retire_delay": "5s",
            "check_interval": "1s",
        },
        leader_election={"enabled": False},
    )
    for mesh in two.meshes.values():
        mesh.control_plane(started=wall_clock() - HOUR)
    drill = Drill(two, linkerd_check, tmp_path)
    drill.daemon.start()
    try:
        first = drill.until("published", lambda r: r.active_root is not None)
        drill.until("published in both", lambda r: all(_published(c) for _, c in two.clusters()))
        old_root = first.active_root
        assert old_root is not None
        for name, cluster in two.clusters():
            two.meshes[name].app("web", cluster.bundle_pem(), started=wall_clock())
        settings = two.settings
        anchor, journal = build_anchor_and_journal(settings)
        op = Engine(settings, anchor, journal, []).request_rotation("trust-anchor", "drill")

        drill.until("propagating", lambda r: r.phase is Phase.PROPAGATING)
        drill.daemon.kill9("propagating")
        drill.daemon.start()
        drill.until("retiring", lambda r: r.phase is Phase.RETIRING)
        drill.daemon.kill9("retiring")
        drill.daemon.start()

        def rotated(r: CaRecord) -> bool:
            done = r.operation(op)
            return r.phase is Phase.STEADY and done is not None and not done.open

        record = drill.until("retired", rotated)
    finally:
        drill.daemon.stop()

    assert drill.daemon.kills == ["propagating", "retiring"]
    done = record.operation(op)
    assert done is not None and done.state is OpState.SUCCEEDED, done
    new_root = record.active_root
    assert new_root is not None and new_root.ref != old_root.ref
    assert [r.ref for r in record.roots] == [new_root.ref]
    for name, cluster in two.clusters():
        roots = [fingerprint(r) for r in parse_pem_certificates(cluster.bundle_pem())]
        assert roots == [fingerprint(new_root.cert)], name
        assert directly_issued_by(cluster.issuer_cert(), new_root.cert), name
    # The kill left no second next root behind: the old one and the new one only.
    assert two.home.vault.issuer_names(two.home.root_mount) == sorted([old_root.ref, new_root.ref])
    assert drill.observer.polls > 10
    assert {HOME, LINKED} <= set(drill.observer.seen)
