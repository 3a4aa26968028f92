"""Whether Linkerd's identity controller confirmed the issuer in the journal: pure, from
the journaled answer (see publish/linkerd_identity.py for where the answer comes from).

A root rotation's retirement waits for it, status and metrics show it, and an issuer
refused, or unanswered for ``linkerd.confirm_timeout``, is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import State

Confirmation = Literal["loaded", "refused", "waiting", "overdue"]


def issuer_serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _stamp(at: datetime) -> str:
    return f"{at:%Y-%m-%dT%H:%M:%SZ}"


@dataclass(frozen=True)
class IssuerConfirmation:
    state: Confirmation
    serial: str
    since: datetime  # when it was first written to the cluster (or made, until then)
    answered_at: datetime | None = None
    message: str = ""
    out: bool = True  # written to the cluster yet

    @property
    def where(self) -> str:
        since = _stamp(self.since)
        return f"in the cluster since {since}" if self.out else f"made {since}, not yet published"

    def text(self, now: datetime) -> str:
        match self.state:
            case "loaded":
                assert self.answered_at is not None
                return f"Linkerd loaded issuer {self.serial} at {_stamp(self.answered_at)}"
            case "refused":
                return f"Linkerd refused issuer {self.serial}: {self.message}"
        waited = int((now - self.since).total_seconds())
        return f"no answer from Linkerd about issuer {self.serial} after {waited}s"

    @property
    def problem(self) -> bool:
        return self.state in ("refused", "overdue")


def asks(settings: Settings, cluster: bool, linked: str | None = None) -> bool:
    """Whether Linkerd's identity controller is asked at all: Linkerd on, publishing to a
    cluster to read its Events from, and ``linkerd.confirm: events`` (``linked``: in that
    linked cluster, by its own settings; None: home)."""
    if linked is not None and not settings.linked(linked).in_rotation:
        return False  # left out of rotations: its identity controller is not asked
    linkerd = settings.linkerd_of(linked)
    return settings.linkerd.enabled and linkerd.enabled and linkerd.confirm == "events" and cluster


def confirmation(
    state: State, settings: Settings, now: datetime, cluster: bool, linked: str | None = None
) -> IssuerConfirmation | None:
    """Linkerd's answer about the journal's issuer (``linked``: that linked cluster's);
    None when it is not asked, or when the journal never noted an issuer published (one
    from before ca-daemon asked Linkerd)."""
    issuer = state.issuer(linked)
    record = state.ca.answer(linked)
    if not asks(settings, cluster, linked) or issuer is None or record is None:
        return None
    timeout = settings.linkerd_of(linked).confirm_timeout
    serial = issuer_serial(issuer.cert)
    if record.serial != serial:  # made, not yet out in the cluster
        return replace(_waiting(serial, issuer.issued, now, timeout), out=False)
    if record.loaded is None:
        return _waiting(serial, record.published_at, now, timeout)
    verdict: Confirmation = "loaded" if record.loaded else "refused"
    return IssuerConfirmation(verdict, serial, record.published_at, record.at, record.message)


def _waiting(serial: str, since: datetime, now: datetime, timeout: timedelta) -> IssuerConfirmation:
    overdue = now - since >= timeout
    return IssuerConfirmation("overdue" if overdue else "waiting", serial, since)


def issuer_unconfirmed(
    state: State, settings: Settings, now: datetime, cluster: bool, linked: str | None = None
) -> str | None:
    """Why retirement must wait for Linkerd's identity controller, or None."""
    found = confirmation(state, settings, now, cluster, linked)
    if found is None or found.state == "loaded":
        return None
    where = f" in cluster {linked}" if linked else ""
    if found.state == "refused":
        return (
            f"Linkerd's identity controller{where} refused issuer {found.serial}: {found.message}"
        )
    return (
        f"waiting for Linkerd's identity controller{where} to load issuer {found.serial} "
        f"({found.where})"
    )
