"""Linked clusters in publish/clusters.py: how a roll, the gate and the lagging Pods'
Event are shared out among every cluster's rollout, and what a linked cluster's publish
reports (holding a root rotation, reached or not). Recorders and answering publishers
stand in for LinkerdRollout and KubernetesPublisher, which
tests/system/test_multicluster_rotation.py runs on two real API servers; these pin the
rules each cluster's settings and answers decide."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import pytest

from ca_daemon.model.world import TrustWorld
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.clusters import ClusterPublisher, ClusterRollouts, Member, pods_of, reached
from ca_daemon.publish.linkerd_identity import Answer
from ca_daemon.util.kube import UNREACHABLE
from tests.support.clock import NOW

Scope = Literal["control-plane", "all"]


@dataclass
class Recorder:
    pods: list[str] = field(default_factory=list)
    fail: str | None = None
    rolled: list[Scope] = field(default_factory=list)
    reported: list[list[str]] = field(default_factory=list)
    asked: list[bool] = field(default_factory=list)

    def restart(self, scope: Scope, at: datetime) -> list[str]:
        if self.fail:
            raise RuntimeError(self.fail)
        self.rolled.append(scope)
        return [f"deployment/linkerd/{scope}"]

    def would_touch(self, scope: Scope) -> tuple[list[str], list[str]]:
        return [f"deployment/linkerd/{scope}"], list(self.pods)

    def pending_pods(
        self, bundle_pem: str, confirmed_at: datetime, restarted: bool = False
    ) -> list[str]:
        if self.fail:
            raise RuntimeError(self.fail)
        self.asked.append(restarted)
        return list(self.pods)

    def report_pending(self, pods: list[str], bundle_hash: str) -> None:
        self.reported.append(pods)

    def issuer_answer(self, since: datetime) -> Answer | None:
        return Answer(True, since, "home's")

    def report_issuer(self, problem: str | None) -> None:
        pass


def _three() -> tuple[ClusterRollouts, Recorder, Recorder, Recorder]:
    home, east, north = Recorder(["shop/web-1"]), Recorder(["shop/web-2"]), Recorder(["a/b"])
    rollouts = ClusterRollouts(
        [
            Member(None, home, "control-plane"),
            Member("east", east, "all"),
            Member("north", north, "none"),
        ]
    )
    return rollouts, home, east, north


def test_each_cluster_rolls_as_its_own_restart_says() -> None:
    rollouts, home, east, north = _three()
    rolled = rollouts.restart("control-plane", NOW)
    assert (home.rolled, east.rolled, north.rolled) == (["control-plane"], ["all"], [])
    assert rolled == ["deployment/linkerd/control-plane", "east/deployment/linkerd/all"]
    # An emergency rolls everything wherever a roll is allowed at all.
    rollouts.restart("all", NOW)
    assert (home.rolled[-1], east.rolled[-1], north.rolled) == ("all", "all", [])


def test_the_gate_waits_for_every_cluster_and_names_the_cluster() -> None:
    rollouts, home, east, north = _three()
    # Whatever one cluster's gate says: a Pod on an old bundle anywhere breaks the link.
    assert rollouts.pending_pods("", NOW) == ["shop/web-1", "east/shop/web-2", "north/a/b"]
    assert north.asked == [False]
    rollouts.report_pending(["shop/web-1", "east/shop/web-2"], "h")
    assert home.reported[-1] == ["shop/web-1"] and east.reported[-1] == ["shop/web-2"]
    assert north.reported[-1] == []


def test_a_home_namespace_named_like_a_cluster_stays_home_s() -> None:
    pods = ["east/web-9", "east/shop/web-2"]  # home's Pod in namespace east; east's Pod
    assert pods_of(pods, None) == ["east/web-9"]
    assert pods_of(pods, "east") == ["shop/web-2"]


def test_a_cluster_that_cannot_be_asked_fails_the_question_naming_it() -> None:
    rollouts, _, east, _ = _three()
    east.fail = "connection refused"
    with pytest.raises(RuntimeError, match="cluster east: connection refused"):
        rollouts.pending_pods("", NOW)
    with pytest.raises(RuntimeError, match="cluster east: connection refused"):
        rollouts.restart("control-plane", NOW)


def test_a_cluster_is_unreached_only_when_nothing_got_through() -> None:
    assert reached(PublishReport("k"))
    assert not reached(PublishReport("k", errors={"*": "boom"}))
    down = f"read x: {UNREACHABLE} (MaxRetryError)"
    assert not reached(PublishReport("k", errors={"a": down, "b": down}))
    assert reached(PublishReport("k", errors={"a": down, "b": "forbidden by RBAC"}))


@dataclass
class Answering:
    """A publisher standing in for a linked cluster's KubernetesPublisher: the report it
    gives, or the error it raises."""

    report: PublishReport | None = None
    error: Exception | None = None
    seen: list[TrustWorld] = field(default_factory=list)
    description: str = "kubernetes"

    def publish(self, world: TrustWorld) -> PublishReport:
        self.seen.append(world)
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


def test_a_linked_cluster_s_publish_holds_the_rotation_until_it_confirms() -> None:
    world = TrustWorld(roots=())
    ok = ClusterPublisher("east", Answering(PublishReport("kubernetes")), clock=lambda: NOW)
    confirmed = ok.publish(world)
    assert (confirmed.target, confirmed.cluster, confirmed.holds) == (
        "kubernetes/east",
        "east",
        False,
    )
    assert confirmed.reached_at == NOW
    refused = PublishReport("kubernetes", errors={"configmap/l5d/trust": "forbidden by RBAC"})
    held = ClusterPublisher("east", Answering(refused)).publish(world)
    assert held.holds and reached(held)
    down = ClusterPublisher("east", Answering(error=OSError("connection refused")))
    report = down.publish(world)
    assert report.holds and not reached(report) and report.reached_at is None
    assert "connection refused" in report.errors["*"]
    # Left out of rotations: reported, never waited for.
    out = ClusterPublisher("lab", Answering(error=OSError("down")), in_rotation=False)
    report = out.publish(world)
    assert not report.holds and report.bundle_confirmed
