"""Linked clusters: each published through its own Kubernetes client, and Linkerd rolled
and gated in every cluster at once, so that one root rotation moves in lockstep.

A linked cluster sees the shared bundle, its own issuer and its own Kong clients
(``cluster_world``). What it answered is told apart from the home cluster's by its
report's target (``kubernetes/<cluster>``) and by the ``<cluster>/`` before each of its
Pods' names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from ca_daemon.model.world import TrustWorld, cluster_world
from ca_daemon.publish.base import Publisher, PublishReport, Rollout
from ca_daemon.publish.kubernetes import KUBERNETES
from ca_daemon.publish.linkerd_identity import Answer
from ca_daemon.util.kube import UNREACHABLE

Scope = Literal["control-plane", "all"]


def cluster_target(cluster: str) -> str:
    return f"{KUBERNETES}/{cluster}"


def report_of(reports: Sequence[PublishReport], cluster: str | None) -> PublishReport | None:
    """The last report of ``cluster``'s Kubernetes publish (None: home's) among ``reports``."""
    target = KUBERNETES if cluster is None else cluster_target(cluster)
    return next((r for r in reversed(reports) if r.target == target), None)


def reached(report: PublishReport) -> bool:
    """Whether the API server answered this publish: not when it failed as a whole, nor
    when every object failed because no connection could be made."""
    if "*" in report.errors:
        return False
    errors = report.errors.values()
    return not errors or not all(UNREACHABLE in e for e in errors)


class ClusterPublisher:
    """Publishes a linked cluster's part of the world through ``inner`` (a
    KubernetesPublisher built on that cluster's client and settings)."""

    def __init__(
        self,
        cluster: str,
        inner: Publisher,
        in_rotation: bool = True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.cluster = cluster
        self.inner = inner
        self.in_rotation = in_rotation
        self.clock = clock
        self.description = cluster_target(cluster)
        self._reached_at: datetime | None = None  # in memory: per process

    def publish(self, world: TrustWorld) -> PublishReport:
        try:
            report = self.inner.publish(cluster_world(world, self.cluster))
        except Exception as exc:  # as the engine would report it, with the cluster named
            report = PublishReport(self.description, errors={"*": str(exc)})
        if reached(report):
            self._reached_at = self.clock()
        report.target = self.description
        report.cluster = self.cluster
        report.reached_at = self._reached_at
        if self.in_rotation:
            # Not confirmed here: a root rotation holds for this cluster (plan()).
            report.holds = not report.bundle_confirmed
        else:
            # Left out of rotations by the operator: published to, never waited for.
            report.bundle_errors = []
        return report


@dataclass
class Member:
    """One cluster's Linkerd rollout, and how that cluster rolls and gates."""

    cluster: str | None  # None: home (its Pods keep their names unprefixed)
    rollout: Rollout
    restart: Literal["none", "control-plane", "all"]


def _named(cluster: str | None, names: Sequence[str]) -> list[str]:
    return list(names) if cluster is None else [f"{cluster}/{n}" for n in names]


def pods_of(pods: Sequence[str], cluster: str | None) -> list[str]:
    """The Pods of ``cluster`` (None: home) among gate names, as that cluster names them:
    home's are ``namespace/name``, a linked cluster's ``cluster/namespace/name`` (told
    apart by their parts, so a home namespace named like a cluster is still home's)."""
    if cluster is None:
        return [p for p in pods if p.count("/") == 1]
    prefix = f"{cluster}/"
    return [p.removeprefix(prefix) for p in pods if p.count("/") == 2 and p.startswith(prefix)]


class ClusterRollouts:
    """Every cluster's rollout as one: a roll rolls each cluster (as its own
    ``linkerd.restart`` says), the gate waits for every cluster's lagging Pods (whatever
    one cluster's ``linkerd.gate``: a Pod on an old bundle anywhere breaks traffic across
    the link), and one cluster that cannot be asked fails the question, so that nothing
    moves on without it."""

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
            try:
                found = member.rollout.pending_pods(bundle_pem, confirmed_at, restarted)
            except Exception as exc:
                raise RuntimeError(f"cluster {member.cluster or 'home'}: {exc}") from None
            pending += _named(member.cluster, found)
        return pending

    def report_pending(self, pods: list[str], bundle_hash: str) -> None:
        for member in self.members:
            member.rollout.report_pending(pods_of(pods, member.cluster), bundle_hash)

    def of(self, cluster: str) -> Rollout | None:
        """A linked cluster's own rollout (its identity controller is asked through it)."""
        return next((m.rollout for m in self.members if m.cluster == cluster), None)

    def issuer_answer(self, since: datetime) -> Answer | None:
        # The home cluster's; each linked cluster's is asked through of(cluster).
        return self._home().rollout.issuer_answer(since)

    def report_issuer(self, problem: str | None) -> None:
        self._home().rollout.report_issuer(problem)
