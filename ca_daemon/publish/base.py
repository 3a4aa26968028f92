"""What every publisher implements and reports, and what rolls Linkerd's workloads."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from ca_daemon.model.world import TrustWorld
from ca_daemon.publish.linkerd_identity import Answer


@dataclass
class PublishReport:
    """One reconciliation of one target.

    ``errors`` maps an object (file, Kubernetes object, Kong entity) to why it could not
    be written; such an object is left exactly as it was. ``drifted`` names objects found
    changed or deleted by someone else since the daemon wrote them (they were repaired
    unless they also appear in ``errors``).
    """

    target: str
    changed: list[str] = field(default_factory=list)
    drifted: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    # Objects that carry the trust bundle and could not be written. None: the publisher
    # does not tell them apart, so any error counts.
    bundle_errors: list[str] | None = None
    # A linked cluster's report: its name, whether a root rotation holds for it (this
    # publish did not confirm its bundle), and when its API server last answered.
    cluster: str | None = None
    holds: bool = False
    reached_at: datetime | None = None

    @property
    def bundle_confirmed(self) -> bool:
        """Whether the target now holds the world's trust bundle everywhere it carries one:
        a root rotation's propagation clock starts only when every publisher says so."""
        failed = self.errors if self.bundle_errors is None else self.bundle_errors
        return not failed


class Publisher(Protocol):
    description: str

    def publish(self, world: TrustWorld) -> PublishReport:
        """Make the target match ``world``; idempotent, and safe to repeat after a crash."""


class Rollout(Protocol):
    """Rolls Linkerd's workloads and tells which meshed Pods lag (Kubernetes)."""

    description: str

    def restart(self, scope: Literal["control-plane", "all"], at: datetime) -> list[str]: ...

    def would_touch(
        self, scope: Literal["control-plane", "all"]
    ) -> tuple[list[str], list[str]]: ...

    def pending_pods(
        self, bundle_pem: str, confirmed_at: datetime, restarted: bool = False
    ) -> list[str]: ...

    def report_pending(self, pods: list[str], bundle_hash: str) -> None: ...

    def issuer_answer(self, since: datetime) -> Answer | None: ...

    def report_issuer(self, problem: str | None) -> None: ...
