"""The status view: roots, issuers and client certificates with their times. Pure."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from ca_daemon.config import Settings
from ca_daemon.pki.bundle import fingerprint
from ca_daemon.pki.profiles import Kind
from ca_daemon.rotation.plan import renew_at
from ca_daemon.rotation.state import State


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _row(
    kind: Kind,
    name: str,
    state: str,
    cert: x509.Certificate,
    next_rotation: datetime,
    now: datetime,
) -> dict[str, Any]:
    return {
        "kind": kind.value,
        "name": name,
        "state": state,
        "fingerprint": fingerprint(cert),
        "serial": format(cert.serial_number, "x"),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "seconds_left": int((cert.not_valid_after_utc - now).total_seconds()),
        "next_rotation": _iso(next_rotation),
    }


def status_view(state: State, settings: Settings, now: datetime) -> dict[str, Any]:
    jitter = settings.rotation.jitter
    roots = [
        _row(
            Kind.TRUST_ANCHOR,
            r.ref,
            r.role.value,
            r.cert,
            r.cert.not_valid_after_utc - settings.root.rotate_before,
            now,
        )
        for r in state.roots
    ]
    cas = []
    if state.linkerd_issuer is not None:
        cas.append(
            (
                Kind.LINKERD_ISSUER,
                settings.linkerd.issuer_secret,
                state.linkerd_issuer.cert,
                settings.linkerd.issuer.rotate_before,
            )
        )
    if state.kong_intermediate is not None:
        cas.append(
            (
                Kind.KONG_INTERMEDIATE,
                state.kong_intermediate.ref,
                state.kong_intermediate.cert,
                settings.kong.intermediate.rotate_before,
            )
        )
    issuers = [
        _row(kind, name, "active", cert, renew_at(cert, before, jitter), now)
        for kind, name, cert, before in cas
    ]
    policy = {c.name: c.rotate_before for c in settings.kong.clients}
    clients = [
        _row(
            Kind.KONG_CLIENT,
            name,
            "active",
            entry.cert,
            renew_at(entry.cert, policy.get(name, timedelta(0)), jitter),
            now,
        )
        for name, entry in sorted(state.kong_clients.items())
    ]
    return {
        "phase": state.phase.value,
        "roots": roots,
        "issuers": issuers,
        "clients": clients,
    }


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
                row["next_rotation"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return f"rotation phase: {view['phase']}\n" + "\n".join(lines)
