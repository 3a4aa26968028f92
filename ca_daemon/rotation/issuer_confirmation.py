"""Whether Linkerd's identity controller confirmed the issuer in the journal: pure, from
the journaled answer (see publish/linkerd_identity.py for where the answer comes from).

A root rotation's retirement waits for it, status and metrics show it, and an issuer
refused, or unanswered for ``linkerd.confirm_timeout``, is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
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
    issued: datetime
    answered_at: datetime | None = None
    message: str = ""

    def text(self, now: datetime) -> str:
        match self.state:
            case "loaded":
                assert self.answered_at is not None
                return f"Linkerd loaded issuer {self.serial} at {_stamp(self.answered_at)}"
            case "refused":
                return f"Linkerd refused issuer {self.serial}: {self.message}"
        waited = int((now - self.issued).total_seconds())
        return f"no answer from Linkerd about issuer {self.serial} after {waited}s"

    @property
    def problem(self) -> bool:
        return self.state in ("refused", "overdue")


def confirmation(
    state: State, settings: Settings, now: datetime, cluster: bool
) -> IssuerConfirmation | None:
    """Linkerd's answer about the journal's issuer; None when it cannot be asked: Linkerd
    off, ``linkerd.confirm: none``, no issuer yet, or no cluster to read Events from."""
    linkerd = settings.linkerd
    issuer = state.linkerd_issuer
    if not (linkerd.enabled and linkerd.confirm == "events" and cluster) or issuer is None:
        return None
    serial = issuer_serial(issuer.cert)
    answer = state.ca.issuer_answer
    if answer is not None and answer.serial == serial:
        verdict: Confirmation = "loaded" if answer.loaded else "refused"
        return IssuerConfirmation(verdict, serial, issuer.issued, answer.at, answer.message)
    overdue = now - issuer.issued >= linkerd.confirm_timeout
    return IssuerConfirmation("overdue" if overdue else "waiting", serial, issuer.issued)


def issuer_unconfirmed(
    state: State, settings: Settings, now: datetime, cluster: bool
) -> str | None:
    """Why retirement must wait for Linkerd's identity controller, or None."""
    found = confirmation(state, settings, now, cluster)
    if found is None or found.state == "loaded":
        return None
    if found.state == "refused":
        return f"Linkerd's identity controller refused issuer {found.serial}: {found.message}"
    return (
        f"waiting for Linkerd's identity controller to load issuer {found.serial} "
        f"(issued {_stamp(found.issued)})"
    )
