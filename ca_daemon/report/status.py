"""The status view: roots, issuers and client certificates with their times. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import CaRecord, Operation, Phase, RootRole, State, issuer_key
from ca_daemon.pki.bundle import fingerprint
from ca_daemon.pki.profiles import Kind
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.clusters import pods_of, reached, report_of
from ca_daemon.rotation.issuer_confirmation import confirmation
from ca_daemon.rotation.plan import Observations, plan, renew_at, root_due_at
from ca_daemon.rotation.steps import Wait


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CertRow:
    """One certificate the daemon keeps, typed; serialised to JSON only in status_view."""

    kind: Kind
    name: str
    state: str  # active | next | retiring
    cert: x509.Certificate
    next_rotation: datetime


def cert_rows(state: State, settings: Settings) -> list[CertRow]:
    """Every root, issuer, intermediate and client certificate, roots first."""
    ca = state.ca
    jitter = settings.rotation.jitter
    retire = ca.rotation.retire_after if ca.rotation else None
    rows = [
        CertRow(
            Kind.TRUST_ANCHOR,
            r.ref,
            r.role.value,
            r.cert,
            # A retiring root is never rotated: what comes next for it is its retirement.
            retire if r.role is RootRole.RETIRING and retire else root_due_at(r.cert, settings),
        )
        for r in ca.roots
    ]
    active = ca.active_root
    if state.linkerd_issuer is not None:
        cert = state.linkerd_issuer.cert
        due = renew_at(cert, settings.linkerd.issuer.rotate_before, jitter)
        rows.append(
            CertRow(Kind.LINKERD_ISSUER, settings.linkerd.issuer_secret, "active", cert, due)
        )
    linked = {c.name: settings.linked_linkerd(c) for c in settings.linked_clusters}
    for cluster, entry in sorted(state.cluster_issuers.items()):
        if cluster in linked:
            due = renew_at(entry.cert, linked[cluster].issuer.rotate_before, jitter)
            rows.append(
                CertRow(Kind.LINKERD_ISSUER, issuer_key(cluster), "active", entry.cert, due)
            )
    for inter in ca.intermediates:
        role = "active" if active and inter.root_ref == active.ref else "retiring"
        due = renew_at(inter.cert, settings.kong.intermediate.rotate_before, jitter)
        rows.append(CertRow(Kind.KONG_INTERMEDIATE, inter.ref, role, inter.cert, due))
    policy = {c.name: c.rotate_before for c in settings.kong_clients_everywhere}
    rows += [
        CertRow(
            Kind.KONG_CLIENT,
            name,
            "active",
            entry.cert,
            renew_at(entry.cert, policy.get(name, timedelta(0)), jitter),
        )
        for name, entry in sorted(state.kong_clients.items())
    ]
    return rows


def _row(row: CertRow, now: datetime) -> dict[str, Any]:
    cert = row.cert
    return {
        "kind": row.kind.value,
        "name": row.name,
        "state": row.state,
        "fingerprint": fingerprint(cert),
        "serial": format(cert.serial_number, "x"),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "seconds_left": int((cert.not_valid_after_utc - now).total_seconds()),
        "next_rotation": _iso(row.next_rotation),
    }


def status_view(
    state: State,
    settings: Settings,
    now: datetime,
    waiting: str | None = None,
) -> dict[str, Any]:
    ca = state.ca
    rows = cert_rows(state, settings)
    roots = [_row(r, now) for r in rows if r.kind is Kind.TRUST_ANCHOR]
    issuers = [
        _row(r, now) for r in rows if r.kind in (Kind.LINKERD_ISSUER, Kind.KONG_INTERMEDIATE)
    ]
    clients = [_row(r, now) for r in rows if r.kind is Kind.KONG_CLIENT]
    rotation = ca.rotation
    return {
        "phase": ca.phase.value,
        "phase_since": _iso(ca.phase_since) if ca.phase_since else None,
        "rotation": (
            {
                "trigger": rotation.trigger,
                "operation": rotation.operation,
                "emergency": rotation.emergency,
                "retire_on": rotation.retire_on,
                "stage": proof_stage(ca),
                "started_at": _iso(rotation.started_at),
                "bundle_confirmed_at": optional_iso(rotation.confirmed_at),
                "linkerd_restarted_at": optional_iso(rotation.restart_at)
                if rotation.restarted
                else None,
                "activated_at": optional_iso(rotation.activated_at),
                "retire_after": optional_iso(rotation.retire_after),
                "waiting_for": waiting,
                "pending_pods": list(rotation.pending_pods),
                "pending_pods_total": rotation.pending_count,
            }
            if rotation
            else None
        ),
        "roots": roots,
        "issuers": issuers,
        "clients": clients,
        "operations": [operation_view(op) for op in ca.operations],
        "linkerd_issuer": linkerd_issuer_view(state, settings, now),
        "notes": notes(settings),
    }


def clusters_view(
    settings: Settings,
    reports: Sequence[PublishReport],
    pending_pods: Sequence[str],
    state: State | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]] | None:
    """Each cluster as the last publish found it (None: one cluster, nothing to tell
    apart): reached or not and when last, whether a root rotation holds for it, and which
    of its meshed Pods the rotation waits for. Empty facts before the leader's first pass."""
    if not settings.linked_clusters:
        return None
    home = report_of(reports, None)
    views = [
        {
            "name": settings.home_cluster,
            "home": True,
            "in_rotation": True,
            "reached": None if home is None else reached(home),
            "last_contact": None,
            "holds_rotation": None,  # home's publish confirms or not like any other
            "errors": _first_errors(home),
            "pending_pods": pods_of(pending_pods, None),
        }
    ]
    for cluster in settings.linked_clusters:
        found = report_of(reports, cluster.name)
        views.append(
            {
                "name": cluster.name,
                "home": False,
                "in_rotation": cluster.in_rotation,
                "reached": None if found is None else reached(found),
                "last_contact": optional_iso(found.reached_at) if found else None,
                "holds_rotation": found.holds if found else None,
                "errors": _first_errors(found),
                "pending_pods": pods_of(pending_pods, cluster.name),
                "linkerd_issuer": (
                    linkerd_issuer_view(state, settings, now, cluster.name)
                    if state is not None and now is not None
                    else None
                ),
            }
        )
    return views


def _first_errors(report: PublishReport | None, shown: int = 3) -> list[str]:
    if report is None:
        return []
    return [f"{obj}: {error}" for obj, error in list(report.errors.items())[:shown]]


def linkerd_issuer_view(
    state: State, settings: Settings, now: datetime, linked: str | None = None
) -> dict[str, Any] | None:
    """Whether Linkerd's identity controller loaded the journal's issuer (``linked``: that
    linked cluster's; None: not asked: files only, Linkerd off or ``linkerd.confirm: none``)."""
    found = confirmation(state, settings, now, settings.kubernetes_enabled, linked)
    if found is None:
        return None
    return {
        "state": found.state,
        "serial": found.serial,
        "published_at": _iso(found.since) if found.out else None,
        "answered_at": optional_iso(found.answered_at),
        "message": found.message,
        "text": found.text(now),
    }


def notes(settings: Settings) -> list[str]:
    """What this configuration does not do that an operator may expect it to."""
    linkerd = settings.linkerd
    if settings.kubernetes_enabled or not linkerd.enabled:
        return []
    if linkerd.restart == "none" and linkerd.gate != "pods":
        return []
    return [
        "files only: Linkerd is neither restarted nor gated here (linkerd.restart and "
        "linkerd.gate act through Kubernetes); during a root rotation, restart Linkerd's "
        "control plane and workloads yourself once the two-root bundle is published, "
        "before rotation.propagation_delay ends"
    ]


def waiting_for(state: State, settings: Settings, now: datetime) -> str | None:
    """What a root rotation waits for, as plan() decides it from the journal alone (the
    running daemon also knows what publishers and Pods showed on its last pass; the
    lagging Pods it journals)."""
    rotation = state.ca.rotation
    pending = tuple(rotation.pending_pods) if rotation and rotation.pending_count else None
    observations = Observations(
        cluster=settings.kubernetes_enabled and settings.linkerd.enabled, pending_pods=pending
    )
    steps = plan(state, now, settings, observations)
    return next((s.text for s in steps if isinstance(s, Wait)), None)


def proof_roll(phase: Phase) -> int:
    """Which of the three data-plane rolls of a retirement on proof ``phase`` is in
    (0: steady)."""
    return {Phase.STEADY: 0, Phase.ACTIVATED: 2, Phase.RETIRING: 3}.get(phase, 1)


_ROLLS = {
    1: "the two-root bundle out, every meshed Pod restarted to hold it",
    2: "everything re-issued under the new root, every meshed Pod restarted",
    3: "the bundle without the old root out, every meshed Pod restarted to hold it",
}


def proof_stage(ca: CaRecord) -> str | None:
    """Where a rotation that retires on proof is, as one of its three rolls (None: it
    retires on expiry, or none runs)."""
    rotation = ca.rotation
    if rotation is None or not rotation.proof:
        return None
    roll = proof_roll(ca.phase)
    return f"{roll} of 3: {_ROLLS[roll]}"


def operation_view(op: Operation) -> dict[str, Any]:
    return {
        "id": op.id,
        "target": op.target,
        "emergency": op.emergency,
        "reason": op.reason,
        "state": op.state.value,
        "requested_at": _iso(op.requested_at),
        "finished_at": optional_iso(op.finished_at),
        "result": op.result,
    }


def optional_iso(moment: datetime | None) -> str | None:
    """A time as status shows it, or None."""
    return _iso(moment) if moment else None


def _left(seconds: int) -> str:
    if seconds <= 0:
        return "EXPIRED"
    days, rest = divmod(seconds, 86400)
    return f"{days}d{rest // 3600}h" if days else f"{rest // 3600}h{(rest % 3600) // 60}m"


def render_table(view: dict[str, Any]) -> str:
    header = ("KIND", "NAME", "STATE", "NOT AFTER", "LEFT", "NEXT ROTATION")
    rows = [header]
    for row in [*view["roots"], *view["issuers"], *view["clients"]]:
        rows.append(
            (
                row["kind"],
                row["name"],
                row["state"],
                row["not_after"],
                _left(row["seconds_left"]),
                f"retires {row['next_rotation']}"
                if row["state"] == "retiring" and row["kind"] == Kind.TRUST_ANCHOR.value
                else row["next_rotation"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    head = [f"note: {line}" for line in view.get("notes", [])]
    head.append(f"rotation phase: {view['phase']}")
    if view.get("linkerd_issuer"):
        head.append(f"linkerd: {view['linkerd_issuer']['text']}")
    rotation = view.get("rotation")
    if rotation:
        if rotation.get("emergency"):
            head.append("EMERGENCY root rotation: the old root leaves once proven unused")
        if rotation.get("stage"):
            head.append(f"stage {rotation['stage']}")
        if rotation.get("waiting_for"):
            head.append(f"waiting for: {rotation['waiting_for']}")
        if rotation.get("pending_pods_total"):
            names = ", ".join(rotation["pending_pods"])
            head.append(f"pods it waits for ({rotation['pending_pods_total']}): {names}")
    head += [_cluster_line(c) for c in view.get("clusters") or []]
    return "\n".join(head) + "\n" + "\n".join(lines)


def _cluster_line(cluster: dict[str, Any]) -> str:
    role = "home" if cluster["home"] else "linked"
    parts = [f"cluster {cluster['name']} ({role})"]
    if not cluster["in_rotation"]:
        parts.append("OUT of root rotations (clusters[].in_rotation: false)")
    if cluster["reached"] is False:
        parts.append(f"NOT reached (last contact: {cluster['last_contact'] or 'never'})")
    elif cluster["reached"]:
        parts.append("reached")
    if cluster["holds_rotation"]:
        parts.append("holds the root rotation")
    if cluster["pending_pods"]:
        parts.append(f"{len(cluster['pending_pods'])} lagging pod(s)")
    issuer = cluster.get("linkerd_issuer")
    if issuer:
        parts.append(f"linkerd: {issuer['text']}")
    parts += cluster["errors"][:1]
    return ": ".join(parts[:1]) + ": " + "; ".join(parts[1:]) if parts[1:] else parts[0]


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def expired(state: State, settings: Settings, now: datetime) -> list[str]:
    """A sentence for every root, issuer or client certificate in the journal that expired."""
    found: list[tuple[str, x509.Certificate]] = [
        (f"trust anchor {r.ref} ({r.role.value})", r.cert) for r in state.ca.roots
    ]
    if settings.linkerd.enabled and state.linkerd_issuer is not None:
        found.append(
            (f"linkerd issuer {settings.linkerd.issuer_secret}", state.linkerd_issuer.cert)
        )
    if settings.linkerd.enabled:
        linked = {c.name for c in settings.linked_clusters}
        found += [
            (f"linkerd issuer of cluster {name}", entry.cert)
            for name, entry in sorted(state.cluster_issuers.items())
            if name in linked
        ]
    inter = state.ca.active_intermediate
    if settings.kong.enabled and inter is not None:
        found.append((f"kong intermediate {inter.ref}", inter.cert))
    configured = {c.name for c in settings.kong_clients_everywhere}
    found += [
        (f"kong client {name}", entry.cert)
        for name, entry in sorted(state.kong_clients.items())
        if name in configured
    ]
    return [
        f"{what} expired at {_when(cert.not_valid_after_utc)}"
        for what, cert in found
        if cert.not_valid_after_utc <= now
    ]


def warnings(state: State, settings: Settings, now: datetime) -> list[str]:
    """What is not yet broken but should not be: a steady root inside root.rotate_before;
    an issuer Linkerd refused or has not confirmed within linkerd.confirm_timeout."""
    issuer = []
    for linked in [None, *(c.name for c in settings.linked_clusters)]:
        found = confirmation(state, settings, now, settings.kubernetes_enabled, linked)
        if found is not None and found.problem:
            issuer.append(f"cluster {linked}: {found.text(now)}" if linked else found.text(now))
    if state.ca.phase is not Phase.STEADY:
        return issuer  # a rotation is under way: a root near its end is expected
    return issuer + [
        f"trust anchor {r.ref} expires at {_when(r.cert.not_valid_after_utc)}, inside "
        f"root.rotate_before, and no root rotation has started: is the daemon running?"
        for r in state.ca.roots
        if root_due_at(r.cert, settings) <= now < r.cert.not_valid_after_utc
    ]
