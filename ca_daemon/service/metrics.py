"""Prometheus metrics (prefix ca_daemon_), all read from a pass result and the state.

A registry of its own, so tests and embedders never share global collectors.
"""

from __future__ import annotations

import collections
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from ca_daemon import __version__
from ca_daemon.config.settings import Settings
from ca_daemon.model.state import OpState, Phase, State, trusted_roots
from ca_daemon.publish.clusters import pods_of, reached, report_of
from ca_daemon.report.status import cert_rows, proof_roll
from ca_daemon.rotation.issuer_confirmation import confirmation
from ca_daemon.rotation.results import PassResult
from ca_daemon.rotation.steps import ISSUING_STEPS

CERT_LABELS = ("kind", "name", "state")
# Steps that issue a certificate: what ca_daemon_rotations_total counts.


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.not_after = Gauge(
            "ca_daemon_certificate_not_after_timestamp_seconds",
            "Not-after of each certificate the daemon owns.",
            CERT_LABELS,
            registry=r,
        )
        self.not_before = Gauge(
            "ca_daemon_certificate_not_before_timestamp_seconds",
            "Not-before of each certificate the daemon owns.",
            CERT_LABELS,
            registry=r,
        )
        self.next_rotation = Gauge(
            "ca_daemon_next_rotation_timestamp_seconds",
            "When each certificate is next due for rotation.",
            ("kind", "name"),
            registry=r,
        )
        self.rotations = Counter(
            "ca_daemon_rotations",
            "Issuances and rotations, by trigger and result.",
            ("kind", "trigger", "result"),
            registry=r,
        )
        self.last_success = Gauge(
            "ca_daemon_last_rotation_success_timestamp_seconds",
            "When each certificate was last issued successfully.",
            ("kind", "name"),
            registry=r,
        )
        self.phase = Gauge(
            "ca_daemon_root_rotation_phase",
            "1 for the current root rotation phase, 0 for the others.",
            ("phase",),
            registry=r,
        )
        self.emergency = Gauge(
            "ca_daemon_root_rotation_emergency",
            "1 while an emergency root rotation (after a key leaked) is in progress; its "
            "stage (1-3: the three data-plane rolls of a retirement on proof) in the label.",
            ("stage",),
            registry=r,
        )
        self.bundle_roots = Gauge(
            "ca_daemon_trust_bundle_roots", "Roots in the published trust bundle.", registry=r
        )
        self.anchor_up = Gauge(
            "ca_daemon_anchor_up", "1 when the anchor backend answered the last check.", registry=r
        )
        self.publish_errors = Counter(
            "ca_daemon_publish_errors",
            "Objects that could not be published, by target object.",
            ("target",),
            registry=r,
        )
        self.drift = Gauge(
            "ca_daemon_drift",
            "1 when the last check found a published object changed since the daemon wrote it.",
            ("target",),
            registry=r,
        )
        self.leader = Gauge("ca_daemon_leader", "1 on the leader.", registry=r)
        self.pending_pods = Gauge(
            "ca_daemon_root_rotation_pending_pods",
            "Meshed Pods that a root rotation waits for: not yet holding the bundle being "
            "propagated (or, retiring on proof, not restarted since everything was re-issued).",
            registry=r,
        )
        self.operations = Gauge(
            "ca_daemon_operations", "Manual operations by state.", ("state",), registry=r
        )
        # Set by the daemon's loop after every pass (a pass is all of one check's work).
        self.consecutive_failures = Gauge(
            "ca_daemon_consecutive_failures",
            "Passes that failed in a row; 0 once one succeeds.",
            registry=r,
        )
        self.backoff = Gauge(
            "ca_daemon_backoff_seconds",
            "Delay before the retry of a failed pass; 0 when the next pass is at the usual "
            "check_interval.",
            registry=r,
        )
        # Linkerd's identity controller's answer about the issuer in the journal; absent
        # when it is not asked (files only, Linkerd off, linkerd.confirm: none).
        self.issuer_loaded = Gauge(
            "ca_daemon_linkerd_issuer_loaded",
            "1 when Linkerd's identity controller loaded the issuer (by serial), else 0.",
            ("cluster", "serial"),
            registry=r,
        )
        self.issuer_unconfirmed = Gauge(
            "ca_daemon_linkerd_issuer_unconfirmed_seconds",
            "Seconds since the issuer was made that Linkerd has not confirmed loading it; "
            "0 once it did.",
            ("cluster", "serial"),
            registry=r,
        )
        self.issuer_problem = Gauge(
            "ca_daemon_linkerd_issuer_problem",
            "1 when Linkerd refused the issuer (refused) or said nothing about it for "
            "linkerd.confirm_timeout (overdue).",
            ("cluster", "reason"),
            registry=r,
        )
        # Per cluster (several clusters served from one root), from the leader's last
        # publish; absent with one cluster.
        self.cluster_reached = Gauge(
            "ca_daemon_cluster_reached",
            "1 when the last publish reached the cluster's API server, else 0.",
            ("cluster",),
            registry=r,
        )
        self.cluster_last_contact = Gauge(
            "ca_daemon_cluster_last_contact_timestamp_seconds",
            "When the cluster's API server last answered a publish.",
            ("cluster",),
            registry=r,
        )
        self.cluster_holds = Gauge(
            "ca_daemon_cluster_holds_root_rotation",
            "1 while a root rotation cannot move on for this linked cluster: its last "
            "publish did not confirm the trust bundle (unreachable, or refused).",
            ("cluster",),
            registry=r,
        )
        self.cluster_pending_pods = Gauge(
            "ca_daemon_cluster_pending_pods",
            "Meshed Pods in this cluster that a root rotation waits for.",
            ("cluster",),
            registry=r,
        )
        self.cluster_in_rotation = Gauge(
            "ca_daemon_cluster_in_rotation",
            "1 when the cluster takes part in root rotations; 0 when the operator left it "
            "out (clusters[].in_rotation: false).",
            ("cluster",),
            registry=r,
        )
        self.build_info = Gauge(
            "ca_daemon_build_info", "Build information.", ("version",), registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        # Set by the daemon: 1 without leader election, else what the Lease says.
        self._drifted: set[str] = set()
        # (kind, name) → (role, not after, not before, next rotation) as last exported.
        self._certificates: dict[tuple[str, str], tuple[str, float, float, float]] = {}

    def observe(
        self, result: PassResult, settings: Settings, now: datetime, trigger: str = "schedule"
    ) -> None:
        self.anchor_up.set(1 if result.anchor_up else 0)
        for step in result.steps:
            if not isinstance(step.step, ISSUING_STEPS):
                continue  # phase changes and bookkeeping issue no certificate
            outcome = "success" if step.ok else "failure"
            cause = "manual" if step.manual else trigger
            self.rotations.labels(step.kind.value, cause, outcome).inc()
            if step.ok:
                self.last_success.labels(step.kind.value, step.name).set(now.timestamp())
        drifted: set[str] = set()
        for report in result.reports:
            for target in report.errors:
                self.publish_errors.labels(target).inc()
            drifted |= {d.split(" ", 1)[0] for d in report.drifted}
        for target in self._drifted - drifted:
            self.drift.labels(target).set(0)
        for target in drifted:
            self.drift.labels(target).set(1)
        self._drifted |= drifted
        self._observe_clusters(result, settings)
        if result.state is not None:
            self.observe_state(result.state, settings, now)

    def forget_clusters(self) -> None:
        """A standby publishes nothing: what it said as leader about each cluster is no
        longer true (the alert takes the max over replicas)."""
        for gauge in (
            self.cluster_reached,
            self.cluster_last_contact,
            self.cluster_holds,
            self.cluster_pending_pods,
            self.cluster_in_rotation,
        ):
            gauge.clear()

    def _observe_clusters(self, result: PassResult, settings: Settings) -> None:
        if not settings.linked_clusters:
            return
        pending = result.pending_pods or ()
        home = settings.home_cluster
        self.cluster_in_rotation.labels(home).set(1)
        self.cluster_pending_pods.labels(home).set(len(pods_of(pending, None)))
        home_report = report_of(result.reports, None)
        if home_report is not None:
            self.cluster_reached.labels(home).set(1 if reached(home_report) else 0)
        for cluster in settings.linked_clusters:
            name = cluster.name
            self.cluster_in_rotation.labels(name).set(1 if cluster.in_rotation else 0)
            self.cluster_pending_pods.labels(name).set(len(pods_of(pending, name)))
            report = report_of(result.reports, name)
            if report is None:
                continue
            self.cluster_reached.labels(name).set(1 if reached(report) else 0)
            self.cluster_holds.labels(name).set(1 if report.holds else 0)
            if report.reached_at is not None:
                self.cluster_last_contact.labels(name).set(_seconds(report.reached_at))

    def observe_state(self, state: State, settings: Settings, now: datetime) -> None:
        self._observe_certificates(state, settings)
        for phase in Phase:
            self.phase.labels(phase.value).set(1 if state.ca.phase is phase else 0)
        self.bundle_roots.set(len(trusted_roots(state.ca)))
        rotation = state.ca.rotation
        gated = state.ca.phase is Phase.PROPAGATING or (rotation is not None and rotation.proof)
        self.pending_pods.set(rotation.pending_count if gated and rotation else 0)
        self.emergency.clear()
        if rotation is not None and rotation.emergency:
            self.emergency.labels(str(proof_roll(state.ca.phase))).set(1)
        counts = collections.Counter(op.state for op in state.ca.operations)
        for op_state in OpState:
            self.operations.labels(op_state.value).set(counts.get(op_state, 0))
        self._observe_issuer(state, settings, now)

    def _observe_certificates(self, state: State, settings: Settings) -> None:
        """One series per certificate, touched only when it changed: at 5,000 clients,
        making 15,000 series anew at every pass was most of an idle daemon's CPU."""
        found: dict[tuple[str, str], tuple[str, float, float, float]] = {}
        for row in cert_rows(state, settings):
            series = (row.kind.value, row.name)
            values = (
                row.state,
                _seconds(row.cert.not_valid_after_utc),
                _seconds(row.cert.not_valid_before_utc),
                _seconds(row.next_rotation),
            )
            found[series] = values
            before = self._certificates.get(series)
            if before == values:
                continue
            if before is not None and before[0] != row.state:
                self.not_after.remove(*series, before[0])
                self.not_before.remove(*series, before[0])
            self.not_after.labels(*series, row.state).set(values[1])
            self.not_before.labels(*series, row.state).set(values[2])
            self.next_rotation.labels(*series).set(values[3])
        for series, (role, *_) in self._certificates.items():
            if series not in found:
                self.not_after.remove(*series, role)
                self.not_before.remove(*series, role)
                self.next_rotation.remove(*series)
        self._certificates = found

    def _observe_issuer(self, state: State, settings: Settings, now: datetime) -> None:
        for gauge in (self.issuer_loaded, self.issuer_unconfirmed, self.issuer_problem):
            gauge.clear()
        for linked in [None, *(c.name for c in settings.linked_clusters)]:
            found = confirmation(state, settings, now, settings.kubernetes_enabled, linked)
            if found is None:
                continue
            cluster = linked or settings.home_cluster
            loaded = found.state == "loaded"
            self.issuer_loaded.labels(cluster, found.serial).set(1 if loaded else 0)
            waited = 0.0 if loaded else max(0.0, (now - found.since).total_seconds())
            self.issuer_unconfirmed.labels(cluster, found.serial).set(float(int(waited)))
            for reason in ("refused", "overdue"):
                self.issuer_problem.labels(cluster, reason).set(1 if found.state == reason else 0)


def _seconds(moment: datetime) -> float:
    # Whole seconds, as the status API shows them (a jittered renewal time has a fraction).
    return float(int(moment.timestamp()))
