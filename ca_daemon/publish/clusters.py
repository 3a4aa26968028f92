"""Linked clusters: each published through its own Kubernetes client, and Linkerd rolled
and gated in every cluster at once, so that one root rotation moves in lockstep.

A linked cluster sees the shared bundle and its own issuer (``cluster_world``). What it
answered is told apart from the home cluster's by its report's target
(``kubernetes/<cluster>``) and by the ``<cluster>/`` before each of its Pods' names.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from ca_daemon.model.world import TrustWorld, cluster_world
from ca_daemon.publish.base import Publisher, PublishReport
from ca_daemon.publish.kubernetes import KUBERNETES
from ca_daemon.publish.linkerd_identity import Answer

log = logging.getLogger(__name__)

Scope = Literal["control-plane", "all"]


def cluster_target(cluster: str) -> str:
    return f"{KUBERNETES}/{cluster}"


@dataclass(frozen=True)
class Contact:
    """What the last publish to a linked cluster showed."""

    cluster: str
    in_rotation: bool
    reached_at: datetime | None = None  # the last publish that reached its API server
    error: str | None = None  # why the last publish failed (None: it did not)


@dataclass
class Contacts:
    """Every linked cluster's last contact, shared by its publisher (which writes it) and
    the status API and metrics (which read it); kept in memory, per replica."""

    _seen: dict[str, Contact] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, contact: Contact) -> None:
        with self._lock:
            self._seen[contact.cluster] = contact

    def all(self) -> list[Contact]:
        with self._lock:
            return sorted(self._seen.values(), key=lambda c: c.cluster)


class ClusterPublisher:
    """Publishes a linked cluster's part of the world through ``inner`` (a
    KubernetesPublisher built on that cluster's client and settings)."""

    def __init__(
        self,
        cluster: str,
        inner: Publisher,
        contacts: Contacts,
        in_rotation: bool = True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.cluster = cluster
        self.inner = inner
        self.contacts = contacts
        self.in_rotation = in_rotation
        self.clock = clock
        self.description = cluster_target(cluster)

    def publish(self, world: TrustWorld) -> PublishReport:
        before = next((c for c in self.contacts.all() if c.cluster == self.cluster), None)
        try:
            report = self.inner.publish(cluster_world(world, self.cluster))
        except Exception as exc:  # the engine reports it; the contact names it too
            report = PublishReport(self.description, errors={"*": str(exc)})
        report.target = self.description
        if self.in_rotation:
            # Not confirmed here: the rotation holds for this cluster (plan's unreachable).
            report.holds = None if report.bundle_confirmed else self.cluster
        else:
            # Left out of rotations by the operator: published to, never waited for.
            report.bundle_errors = []
        reached = "*" not in report.errors
        error = "; ".join(f"{k}: {v}" for k, v in list(report.errors.items())[:3]) or None
        self.contacts.note(
            Contact(
                self.cluster,
                self.in_rotation,
                self.clock() if reached else (before.reached_at if before else None),
                error,
            )
        )
        return report


class RolloutLike(Protocol):
    """What ``Member`` needs of a rollout (rotation/ca_steps.Rollout, structurally)."""

    def restart(self, scope: Scope, at: datetime) -> list[str]: ...

    def would_touch(self, scope: Scope) -> tuple[list[str], list[str]]: ...

    def pending_pods(
        self, bundle_pem: str, confirmed_at: datetime, restarted: bool = False
    ) -> list[str]: ...

    def report_pending(self, pods: list[str], bundle_hash: str) -> None: ...

    def issuer_answer(self, since: datetime) -> Answer | None: ...

    def report_issuer(self, problem: str | None) -> None: ...


@dataclass
class Member:
    """One cluster's Linkerd rollout, and how that cluster rolls and gates."""

    cluster: str | None  # None: home (its Pods keep their names unprefixed)
    rollout: RolloutLike
    restart: Literal["none", "control-plane", "all"]
    gated: bool  # linkerd.gate is pods


def _named(cluster: str | None, names: Sequence[str]) -> list[str]:
    return list(names) if cluster is None else [f"{cluster}/{n}" for n in names]


class ClusterRollouts:
    """Every cluster's rollout as one: a roll rolls each cluster (as its own
    ``linkerd.restart`` says), the gate waits for every cluster's lagging Pods, and one
    cluster that cannot be asked fails the question, so that nothing moves on without it."""

    description = "linkerd-rollout"

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = list(members)

    def _home(self) -> Member:
        return next(m for m in self.members if m.cluster is None)

    def _scope(self, member: Member, scope: Scope) -> Scope | None:
        if member.cluster is None:
            return scope
        if member.restart == "none":
            return None
        # An emergency rolls everything everywhere; otherwise each cluster as it says.
        return "all" if scope == "all" else member.restart

    def restart(self, scope: Scope, at: datetime) -> list[str]:
        rolled: list[str] = []
        errors: list[str] = []
        for member in self.members:
            own = self._scope(member, scope)
            if own is None:
                continue
            try:
                rolled += _named(member.cluster, member.rollout.restart(own, at))
            except Exception as exc:  # every cluster is tried; a retry skips the rolled
                errors.append(f"cluster {member.cluster or 'home'}: {exc}")
        if errors:
            raise RuntimeError("; ".join(errors))
        return rolled

    def would_touch(self, scope: Scope) -> tuple[list[str], list[str]]:
        workloads: list[str] = []
        pods: list[str] = []
        for member in self.members:
            own = self._scope(member, scope)
            if own is None:
                continue
            w, p = member.rollout.would_touch(own)
            workloads += _named(member.cluster, w)
            pods += _named(member.cluster, p)
        return workloads, pods

    def pending_pods(
        self, bundle_pem: str, confirmed_at: datetime, restarted: bool = False
    ) -> list[str]:
        pending: list[str] = []
        for member in self.members:
            if not (member.gated or restarted):
                continue
            try:
                found = member.rollout.pending_pods(bundle_pem, confirmed_at, restarted)
            except Exception as exc:
                raise RuntimeError(f"cluster {member.cluster or 'home'}: {exc}") from None
            pending += _named(member.cluster, found)
        return pending

    def report_pending(self, pods: list[str], bundle_hash: str) -> None:
        for member in self.members:
            if member.cluster is None:
                own = [p for p in pods if p.count("/") == 1]
            else:
                prefix = f"{member.cluster}/"
                own = [p.removeprefix(prefix) for p in pods if p.startswith(prefix)]
            member.rollout.report_pending(own, bundle_hash)

    def issuer_answer(self, since: datetime) -> Answer | None:
        # Journaled for the home cluster's issuer only (see docs/multicluster.md).
        return self._home().rollout.issuer_answer(since)

    def report_issuer(self, problem: str | None) -> None:
        self._home().rollout.report_issuer(problem)
