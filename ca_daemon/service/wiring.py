"""Wiring: the anchor, journal, publishers and Linkerd rollout a configuration asks for."""

from __future__ import annotations

from dataclasses import dataclass

from ca_daemon.anchor.base import Anchor
from ca_daemon.config.settings import Settings
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.publish.base import Publisher, Rollout
from ca_daemon.publish.clusters import ClusterPublisher, ClusterRollouts, Member
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.publish.kong_admin import KongAdminPublisher
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.publish.linkerd_rollout import LinkerdRollout
from ca_daemon.rotation.engine import Engine
from ca_daemon.util.kube import api_client


@dataclass(frozen=True)
class Runtime:
    anchor: Anchor
    journal: Journal
    publishers: list[Publisher]
    rollout: Rollout | None = None


def directory_publishing(settings: Settings) -> bool:
    return settings.publish.directory is not None or not settings.kubernetes_enabled


def build_runtime(settings: Settings) -> Runtime:
    anchor, journal = build_anchor_and_journal(settings)
    publishers: list[Publisher] = []
    rollout: Rollout | None = None
    if directory_publishing(settings):
        publishers.append(DirectoryPublisher(settings.publish_directory))
    if settings.kubernetes_enabled:
        home = settings.clusters[0] if settings.clusters else None
        api = api_client(home.kubeconfig, context=home.context) if home else api_client()
        publishers.append(KubernetesPublisher(settings, api))
        members = []
        if settings.linkerd.enabled:
            rollout = LinkerdRollout(settings, api)
            members.append(Member(None, rollout, settings.linkerd.restart))
        for cluster in settings.linked_clusters:
            own = settings.for_cluster(cluster)
            linked_api = api_client(cluster.kubeconfig, context=cluster.context)
            inner = KubernetesPublisher(own, linked_api)
            publishers.append(
                ClusterPublisher(cluster.name, inner, in_rotation=cluster.in_rotation)
            )
            if own.linkerd.enabled and cluster.in_rotation:
                rolling = LinkerdRollout(own, linked_api)
                members.append(Member(cluster.name, rolling, own.linkerd.restart))
        if len(members) > 1:
            rollout = ClusterRollouts(members)
    if settings.kong.enabled and settings.kong.delivery == "admin-api":
        publishers.append(KongAdminPublisher(settings.kong))
    return Runtime(anchor=anchor, journal=journal, publishers=publishers, rollout=rollout)


def build_engine(settings: Settings) -> Engine:
    runtime = build_runtime(settings)
    return Engine(
        settings, runtime.anchor, runtime.journal, runtime.publishers, rollout=runtime.rollout
    )
